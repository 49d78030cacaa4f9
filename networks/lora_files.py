"""The files of every LoRA tool: read a LoRA file and check it, group its tensors per module, tell SD1
from SD2, find the model layers a LoRA targets, merge modules into a model, and write results. The tools'
shared options (precision, device, inputs and output) and their checks are :mod:`networks.lora_tool_options`.

File layout: file_formats.md §1.1-§1.3; tool conventions: tools_and_preprocessing.md §1.2-§1.4.
A LoRA module ``<name>`` is the three keys ``<name>.lora_down.weight``, ``<name>.lora_up.weight``
and (optional, alpha = rank when missing) ``<name>.alpha``; ``<name>`` is the text before the first dot.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from library.errors import UserError
from networks.lora_common import (
    LORA_PREFIX_TEXT_ENCODER,
    LORA_PREFIX_UNET,
    TEXT_ENCODER_TARGET_MODULES,
    UNET_CONV_TARGET_MODULES,
    UNET_TARGET_MODULES,
    find_target_modules,
    lora_delta,
    network_metadata,
    save_state_dict_file,
)
from networks.lycoris_common import LYCORIS_KEYS, lycoris_module_weights, module_kind

logger = logging.getLogger(__name__)

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
DORA = "dora_scale"  # DoRA magnitude, [1, in(, 1, 1)] or [out, 1(, 1, 1)] (networks/lora_dora.py)
SD_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


# ----------------------------------------------------------------------------------------------
# One module


@dataclass
class LoRAModuleWeights:
    """The down/up weights, alpha and (DoRA) ``dora_scale`` of one LoRA module, as stored in the file."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def is_dora(self) -> bool:
        """A DoRA module: the layer weight is re-normalised, so ΔW depends on the base weight."""
        return self.dora_scale is not None

    @property
    def rank(self) -> int:
        """Rows of the down weight."""
        return int(self.down.shape[0])

    @property
    def alpha_value(self) -> float:
        """Alpha as a float (the rank for files without an alpha key)."""
        return float(self.alpha.detach().float()) if self.alpha is not None else float(self.rank)

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha_value / self.rank

    @property
    def is_conv(self) -> bool:
        """The module wraps a Conv2d (its weights are 4-D)."""
        return self.down.dim() == 4

    @property
    def kernel(self) -> tuple[int, int]:
        """Kernel size of the wrapped layer ((1, 1) for Linear)."""
        return (int(self.down.shape[2]), int(self.down.shape[3])) if self.is_conv else (1, 1)

    @property
    def is_conv3x3(self) -> bool:
        """A k×k (k > 1) convolution module ("C3Lier")."""
        return self.kernel != (1, 1)

    @property
    def in_features(self) -> int:
        """Input features/channels of the wrapped layer."""
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        """Output features/channels of the wrapped layer."""
        return int(self.up.shape[0])

    def signature(self) -> tuple[int, int, tuple[int, int]]:
        """(out, in, kernel) of the wrapped layer: equal signatures can be merged."""
        return self.out_features, self.in_features, self.kernel

    def fits(self, layer_signature: tuple[int, int, tuple[int, int]]) -> bool:
        """Whether the module can be merged into a layer of this (out, in, kernel)."""
        return self.signature() == tuple(layer_signature)

    def check_finite(self, source: str | os.PathLike) -> None:
        """UserError when the weights hold NaN/inf (a diverged training run)."""
        if not (torch.isfinite(self.down).all() and torch.isfinite(self.up).all()):
            raise UserError(f"{source}: LoRA module {self.name} contains NaN or infinite weights (training "
                            "diverged?); check the file with networks/check_lora_weights.py")

    def weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` in their stored shapes, in float32; first rounded to ``dtype`` when given."""
        down, up = self.down, self.up
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        return down.float(), up.float()

    def factors(self, dtype: torch.dtype | None = None, device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [out, r], down [r, in·k·k])`` in float32 on ``device``; first rounded to ``dtype`` when given."""
        down, up = self.weights(dtype)
        return (up.reshape(self.out_features, self.rank).to(device=device),
                down.reshape(self.rank, -1).to(device=device))

    def delta(self, multiplier: float = 1.0, dtype: torch.dtype | None = None,
              base: torch.Tensor | None = None) -> torch.Tensor:
        """``multiplier · alpha/rank · up∘down`` in float32 (4-D for convs, 2-D for Linear).

        A DoRA module needs the layer's weight ``base``: its change is ``multiplier · (W' − W)`` with
        ``W' = dora_scale · (W + s·ΔW) / ‖W + s·ΔW‖`` (:mod:`networks.lora_dora`), in ``base``'s shape."""
        down, up = self.weights(dtype)
        if not self.is_dora:
            return lora_delta(down, up) * (multiplier * self.scale)
        if base is None:
            raise ValueError(f"DoRA module {self.name}: the layer weight is needed to compute its change")
        from networks.lora_dora import dora_axis_of, dora_diff

        base = base.detach().float()
        device = base.device
        scaled = (lora_delta(down.to(device), up.to(device)) * self.scale).reshape(base.shape)
        magnitude = self.dora_scale.to(dtype).float() if dtype is not None else self.dora_scale.float()
        axis = dora_axis_of(magnitude.shape, base.shape)
        return dora_diff(base, scaled, magnitude.to(device), axis, multiplier)


@dataclass
class LoRAFile:
    """A loaded LoRA file: every tensor, the safetensors metadata, and the modules."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: dict[str, LoRAModuleWeights]
    is_safetensors: bool
    extra_keys: list[str] = field(default_factory=list)

    def dims(self) -> list[int]:
        """The distinct ranks, sorted."""
        return sorted({m.rank for m in self.modules.values()})

    def alphas(self) -> list[float]:
        """The distinct alphas, sorted."""
        return sorted({m.alpha_value for m in self.modules.values()})


# ----------------------------------------------------------------------------------------------
# Reading


def _not_a_lora_reason(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Why a file without ``lora_down`` keys is not a LoRA file (one phrase)."""
    from library.models.detect import detect_ldm_family

    family = detect_ldm_family(shapes)
    if family in ("sd1", "sd2", "sdxl"):
        return f"it is a Stable Diffusion checkpoint ({SD_NAMES[family]}, 'model.diffusion_model.*' keys), not a LoRA"
    if family == "vae_only":
        return "it holds VAE weights, not a LoRA"
    if any(k.endswith(".oft_blocks") for k in keys):
        return ("it is an OFT file (oft_blocks keys); this tool reads only LoRA files (lora_down/lora_up keys); "
                "networks/merge_lora.py --sd_model merges OFT into a model")
    if any("hada_w" in k or "lokr_w" in k for k in keys):
        return ("it is a LyCORIS LoHa/LoKr file; this tool reads only LoRA files (lora_down/lora_up keys); "
                "networks/merge_lora.py --sd_model merges LoHa/LoKr into a model")
    if any("lora_A." in k or "lora_B." in k for k in keys):
        return "it is a PEFT/diffusers-format LoRA (lora_A/lora_B keys); only kohya-format LoRA files are supported"
    if "emb_params" in keys or "string_to_param" in keys:
        return "it is a Textual Inversion embedding, not a LoRA"
    if not keys:
        return "it holds no tensors"
    return f"it has no '<module>.lora_down.weight' keys (first key: '{keys[0]}')"


def load_lora_file(path: str | os.PathLike, option: str = "--model", allow_lycoris: bool = False) -> LoRAFile:
    """Read and check a LoRA file (``.safetensors`` by content, else a torch pickle, on CPU).

    With ``allow_lycoris`` LoHa/LoKr and OFT modules are read too (as
    :class:`~networks.lycoris_common.LycorisModuleWeights` / :class:`~networks.oft.OFTModuleWeights`, which
    offer ``delta``/``fits``); without it a file with such modules is refused.

    Raises UserError (naming ``option`` and the path) for a missing file, an unreadable file, a file
    that is not a LoRA (a whole checkpoint, a VAE, a LyCORIS file …) and for modules with a missing
    or inconsistent down/up pair. Safetensors keys come in alphabetical order.
    """
    from library.models.statedict import open_state_dict

    path = Path(path)
    if not path.exists():
        raise UserError(f"{option} {path}: no such file")
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; expected a LoRA file (.safetensors, .pt or .ckpt)")
    try:
        lazy = open_state_dict(path)
    except UserError as exc:
        raise UserError(f"{option} {exc}") from None
    is_safetensors = _is_safetensors_file(path)
    keys = sorted(lazy.keys()) if is_safetensors else list(lazy.keys())
    lycoris = any(k.partition(".")[2] in LYCORIS_KEYS for k in keys)
    if (lycoris and not allow_lycoris) or not (lycoris or any(k.endswith("." + DOWN) for k in keys)):
        raise UserError(f"{option} {path} is not a LoRA file: {_not_a_lora_reason(keys, lazy.shapes())}")
    tensors = {k: lazy[k] for k in keys}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    extra: list[str] = []
    for key in keys:
        name, _, rest = key.partition(".")
        if rest in (DOWN, UP, ALPHA, DORA) or rest in LYCORIS_KEYS:
            grouped.setdefault(name, {})[rest] = tensors[key]
        else:
            extra.append(key)
    modules: dict[str, LoRAModuleWeights] = {}
    for name, parts in grouped.items():
        if module_kind(parts) is not None:
            modules[name] = lycoris_module_weights(name, parts, f"{option} {path}")
            continue
        if DOWN not in parts or UP not in parts:
            if DOWN not in parts and UP not in parts:  # an orphan alpha / dora_scale
                extra.extend(f"{name}.{rest}" for rest in parts)
                continue
            have, lack = (DOWN, UP) if DOWN in parts else (UP, DOWN)
            raise UserError(f"{option} {path}: LoRA module {name} has {have} but no {lack}")
        module = LoRAModuleWeights(name, parts[DOWN], parts[UP], parts.get(ALPHA), parts.get(DORA))
        _check_module_shapes(module, path, option)
        modules[name] = module
    metadata = dict(lazy.metadata or {}) if is_safetensors else {}
    return LoRAFile(path, tensors, metadata, modules, is_safetensors, extra)


def _is_safetensors_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _check_module_shapes(m: LoRAModuleWeights, path: Path, option: str) -> None:
    down, up = m.down, m.up
    ok = down.dim() in (2, 4) and up.dim() == down.dim() and up.shape[1] == down.shape[0] and down.shape[0] > 0
    if ok and up.dim() == 4:
        ok = tuple(up.shape[2:]) == (1, 1)
    if not ok:
        raise UserError(f"{option} {path}: LoRA module {m.name} has inconsistent shapes: lora_down "
                        f"{tuple(down.shape)}, lora_up {tuple(up.shape)} (expected [r, in(, k, k)] and [out, r(, 1, 1)])")
    if m.dora_scale is not None:
        from networks.lora_dora import dora_axis_of

        try:
            dora_axis_of(m.dora_scale.shape, (m.out_features, m.in_features))
        except ValueError as exc:
            raise UserError(f"{option} {path}: LoRA module {m.name}: {exc}") from None


def refuse_dora(lora: LoRAFile, tool: str, option: str = "--model") -> None:
    """UserError when ``lora`` has DoRA modules (``dora_scale``), which ``tool`` cannot keep."""
    dora = [name for name, module in lora.modules.items() if getattr(module, "is_dora", False)]
    if dora:
        raise UserError(f"{option} {lora.path} is a DoRA file ({len(dora)} modules with dora_scale, e.g. {dora[0]}); "
                        f"{tool} works on plain LoRA only and cannot keep the magnitude vectors (merge it into a "
                        "model with merge_lora.py --sd_model instead)")


def load_lora_files(paths: Sequence[str], option: str = "--models", allow_lycoris: bool = False) -> list[LoRAFile]:
    """Load several LoRA files (see :func:`load_lora_file`)."""
    return [load_lora_file(p, option, allow_lycoris) for p in paths]


# ----------------------------------------------------------------------------------------------
# SD version


def lora_sd_version(lora: LoRAFile) -> tuple[str | None, str]:
    """``("sd1" | "sd2" | "sdxl" | None, evidence)`` for a LoRA file.

    The weights decide when they can: text-encoder width (768 SD1, 1024 SD2) or the UNet's
    cross-attention context width (attn2 to_k input). Otherwise the metadata decides
    (``ss_base_model_version``, ``ss_v2``, ``modelspec.architecture``). None when nothing tells.
    """
    widths = {768: "sd1", 1024: "sd2"}
    names = list(lora.modules)
    if any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_"))
           for n in names):
        return "sdxl", "SDXL module names"
    for suffix, what in (("_self_attn_q_proj", "text-encoder width"), ("_attn2_to_k", "cross-attention context width")):
        for name in names:
            if name.endswith(suffix):
                width = lora.modules[name].in_features
                if width in widths:
                    return widths[width], f"{what} {width}"
                break
    meta = lora.metadata
    base = meta.get("ss_base_model_version", "")
    for prefix, version in (("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sdxl", "sdxl")):
        if base.startswith(prefix):
            return version, f"ss_base_model_version={base}"
    if meta.get("ss_v2") in ("True", "False"):
        return ("sd2" if meta["ss_v2"] == "True" else "sd1"), f"ss_v2={meta['ss_v2']}"
    arch = meta.get("modelspec.architecture", "")
    for prefix, version in (("stable-diffusion-v1", "sd1"), ("stable-diffusion-v2", "sd2"),
                            ("stable-diffusion-xl", "sdxl")):
        if arch.startswith(prefix):
            return version, f"modelspec.architecture={arch}"
    return None, "unknown"


def common_sd_version(loras: Sequence[LoRAFile]) -> str | None:
    """The SD version shared by all files (None when unknown); UserError when two files disagree."""
    known: tuple[LoRAFile, str, str] | None = None
    for lora in loras:
        version, why = lora_sd_version(lora)
        if version is None:
            continue
        if known is not None and known[1] != version:
            first, v1, why1 = known
            raise UserError(f"mismatched SD versions: {first.path} is an {SD_NAMES[v1]} LoRA ({why1}) but "
                            f"{lora.path} is {SD_NAMES[version]} ({why}); LoRAs of different Stable Diffusion "
                            "versions cannot be merged")
        known = known or (lora, version, why)
    return None if known is None else known[1]


def version_metadata(loras: Sequence[LoRAFile], version: str | None) -> dict[str, str]:
    """``ss_v2`` / ``ss_base_model_version`` for a file made from ``loras`` (empty when unknown)."""
    if version not in ("sd1", "sd2"):
        return {}
    bases = {lora.metadata.get("ss_base_model_version") for lora in loras}
    base = bases.pop() if len(bases) == 1 and None not in bases else ("sd_v2" if version == "sd2" else "sd_v1")
    return {"ss_v2": str(version == "sd2"), "ss_base_model_version": base}


def merged_lora_metadata(loras: Sequence[LoRAFile], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The minimal ``ss_*`` metadata of a file with the LoRA ``tensors`` made from the files ``loras``.

    ``ss_network_dim`` / ``ss_network_alpha`` describe the Linear/1×1 modules, ``ss_network_args``
    ``conv_dim``/``conv_alpha`` the 3×3 ones; several different values read "Dynamic".
    """
    def one(values: set) -> str | None:
        if not values:
            return None
        return str(values.pop()) if len(values) == 1 else "Dynamic"

    modules = []
    for key, down in tensors.items():
        if key.endswith("." + DOWN):
            name = key[:-len(DOWN) - 1]
            alpha = tensors.get(f"{name}.{ALPHA}")
            rank = int(down.shape[0])
            is_3x3 = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
            modules.append((rank, float(alpha) if alpha is not None else float(rank), is_3x3))
    linear = [(r, float(a)) for r, a, conv in modules if not conv]
    conv = [(r, float(a)) for r, a, c in modules if c]
    network_args = None
    if conv:
        network_args = {"conv_dim": one({r for r, _ in conv}), "conv_alpha": one({a for _, a in conv})}
    meta = network_metadata("networks.lora", one({r for r, _ in linear}), one({a for _, a in linear}), network_args)
    meta.update(version_metadata(loras, common_sd_version(loras)))
    return meta


# ----------------------------------------------------------------------------------------------
# The model side


def target_layers(text_encoder: nn.Module | None, unet: nn.Module | None,
                  with_conv: bool) -> list[tuple[str, nn.Module]]:
    """``(lora_name, layer)`` of every layer a LoRA wraps (text encoder first, then UNet); ``with_conv``
    adds the ResNet/down/upsample layers of a C3Lier LoRA. A part given as None contributes nothing."""
    unet_targets = UNET_TARGET_MODULES + (UNET_CONV_TARGET_MODULES if with_conv else ())
    return (find_target_modules(text_encoder, LORA_PREFIX_TEXT_ENCODER, TEXT_ENCODER_TARGET_MODULES)
            + find_target_modules(unet, LORA_PREFIX_UNET, unet_targets))


def model_lora_layers(text_encoder: nn.Module | None, unet: nn.Module | None) -> dict[str, nn.Module]:
    """LoRA module name → Linear/Conv2d layer for every layer a LoRA (LierLa or C3Lier) can target."""
    return dict(target_layers(text_encoder, unet, with_conv=True))


def layer_signature(layer: nn.Module) -> tuple[int, int, tuple[int, int]]:
    """(out, in, kernel) of a Linear or Conv2d."""
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels, tuple(int(k) for k in layer.kernel_size)
    return layer.out_features, layer.in_features, (1, 1)


def _describe(sig: tuple[int, int | None, tuple[int, int] | None]) -> str:
    out, inp, kernel = sig
    if inp is None:  # an OFT module tells only its output size
        return f"{out} outputs"
    return f"{inp}→{out}" + ("" if kernel == (1, 1) else f" ({kernel[0]}×{kernel[1]} conv)")


def match_lora_to_model(lora: LoRAFile, layers: Mapping[str, nn.Module], model_version: str | None,
                        model_name: str, option: str = "--models") -> dict[str, nn.Module]:
    """The model layer of each module of ``lora`` that has one, after checking that the LoRA fits
    (messages name the file as ``option <path>``).

    UserError for an SDXL LoRA, for mismatched SD versions (``lora_sd_version`` vs the model), for a
    module whose shape differs from its layer, and when no module has a layer at all. Modules
    without a layer are logged as "no module found for LoRA weight: <key>" and skipped.
    """
    version, why = lora_sd_version(lora)
    if version == "sdxl":
        raise UserError(f"{option} {lora.path} is an SDXL LoRA ({why}); only SD1.x/SD2.x LoRAs are supported")
    if version is not None and model_version is not None and version != model_version:
        raise UserError(f"mismatched SD versions: {option} {lora.path} is an {SD_NAMES[version]} LoRA ({why}) but "
                        f"{model_name} is an {SD_NAMES[model_version]} model; use a LoRA trained on the same "
                        "Stable Diffusion version")
    found: dict[str, nn.Module] = {}
    for name, module in lora.modules.items():
        layer = layers.get(name)
        if layer is None:
            logger.info("no module found for LoRA weight: %s.%s", name, DOWN)
            continue
        module.check_finite(lora.path)
        if not module.fits(layer_signature(layer)):
            raise UserError(f"{option} {lora.path} does not fit {model_name}: LoRA module {name} is "
                            f"{_describe(module.signature())} but the model layer is "
                            f"{_describe(layer_signature(layer))}; the LoRA was made for another model")
        found[name] = layer
    if not found:
        raise UserError(f"{option} {lora.path}: none of its {len(lora.modules)} modules matches a layer of "
                        f"{model_name} (e.g. {next(iter(lora.modules))}); it was made for another kind of model")
    return found


@torch.no_grad()
def merge_module_into_layer(layer: nn.Module, module: LoRAModuleWeights, ratio: float,
                            merge_dtype: torch.dtype | None = None) -> None:
    """``W ← W + ratio · alpha/rank · up∘down`` (LoRA tensors rounded to ``merge_dtype``, sum in float32,
    stored in the layer's dtype); a DoRA or OFT module adds ``ratio · (W' − W)`` instead. 2-D LoRAs on 1×1 convs
    and 4-D ones on Linear layers are reshaped."""
    weight = layer.weight
    needs_base = getattr(module, "is_dora", False) or getattr(module, "needs_base", False)  # DoRA, OFT
    base = weight.detach() if needs_base else None
    delta = module.delta(ratio, merge_dtype, base).to(weight.device).reshape(weight.shape)
    weight.data = (weight.detach().float() + delta).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# Writing


def save_lora_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                   metadata: Mapping[str, Any] | None, dtype: torch.dtype | None) -> None:
    """Write a LoRA atomically with every tensor (alpha too) cast to ``dtype`` (None: as they are).

    ``.safetensors`` gets ``metadata`` plus freshly computed ``sshs_model_hash``/``sshs_legacy_hash``;
    other extensions are a ``torch.save`` of the plain dict (no metadata).
    """
    out = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu")
        if dtype is not None:
            value = value.to(dtype)
        out[key] = value.contiguous()
    meta = {k: v for k, v in (metadata or {}).items() if not k.startswith("sshs_")}
    save_state_dict_file(out, path, meta)
