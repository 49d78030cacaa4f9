"""Helpers shared by the network modules (:mod:`networks.lora`, :mod:`networks.dylora`, :mod:`networks.oft`,
:mod:`networks.loha`/:mod:`networks.lokr`) and the LoRA tools.

Module discovery and naming (file_formats.md §1.2-§1.3), the 25-block index (§1.6), parsing of
``--network_args`` values (training_options.md §9.1) and of the dropouts, grouping a state dict's keys
by module, reading and writing network files (§1.1) and the ``sshs_*`` hashes (§1.9).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from library.errors import UserError
from library.fileio import atomic_path

logger = logging.getLogger(__name__)

LORA_PREFIX_TEXT_ENCODER = "lora_te"
LORA_PREFIX_UNET = "lora_unet"

# Containers searched for Linear / Conv2d layers (matched by class name, base classes included).
TEXT_ENCODER_TARGET_MODULES = ("CLIPAttention", "CLIPMLP")
UNET_TARGET_MODULES = ("Transformer2DModel",)
UNET_CONV_TARGET_MODULES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

NUM_OF_BLOCKS = 12  # down (and up) blocks of the full model, in LDM numbering
NUM_TOTAL_BLOCKS = NUM_OF_BLOCKS * 2 + 1  # down + mid + up = 25
MID_BLOCK_INDEX = NUM_OF_BLOCKS

LR_WEIGHT_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
DROPOUT_ARGS = ("dropout", "rank_dropout", "module_dropout")

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


# ----------------------------------------------------------------------------------------------
# Module discovery and names


def _class_names(module: nn.Module) -> set[str]:
    """The class name of ``module`` and of all its base classes (so SDPA/flash subclasses match)."""
    return {cls.__name__ for cls in type(module).__mro__}


def lora_module_name(prefix: str, module_path: str) -> str:
    """The LoRA name of a module: ``<prefix>_<dotted path with '_'>``.

    Text-encoder paths always get the ``text_model.`` level that transformers 4 has and
    transformers 5 dropped, so names read ``lora_te_text_model_encoder_layers_0_…`` either way.
    """
    if prefix == LORA_PREFIX_TEXT_ENCODER and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return f"{prefix}.{module_path}".replace(".", "_")


def is_conv3x3(module: nn.Module) -> bool:
    """True for a Conv2d whose kernel is not 1×1 (the "C3Lier" layers)."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def find_target_modules(root: nn.Module | None, prefix: str,
                        target_classes: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """Every Linear/Conv2d inside a container whose class is in ``target_classes``.

    Returns ``(lora_name, layer)`` pairs in ``named_modules()`` order, each layer once.
    """
    if root is None:
        return []
    targets = set(target_classes)
    found: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    for name, container in root.named_modules():
        if not targets & _class_names(container):
            continue
        for child_name, child in container.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            path = f"{name}.{child_name}" if name else child_name
            lora_name = lora_module_name(prefix, path)
            if lora_name in seen:
                continue
            seen.add(lora_name)
            found.append((lora_name, child))
    return found


def block_index(lora_name: str) -> int:
    """The 0-24 UNet block of a LoRA name (file_formats.md §1.6); -1 for text-encoder names."""
    m = _RE_UPDOWN.search(lora_name)
    if m:
        direction, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if direction == "down" else NUM_OF_BLOCKS + 1 + idx
    if "mid_block_" in lora_name:
        return MID_BLOCK_INDEX
    return -1


# ----------------------------------------------------------------------------------------------
# --network_args parsing


def args_error(key: str, value: Any, what: str) -> UserError:
    """A UserError naming ``--network_args`` and the offending key."""
    return UserError(f"--network_args {key}={value}: {what}")


def parse_int_arg(key: str, value: Any) -> int | None:
    """An integer network arg (None stays None)."""
    if value is None:
        return None
    try:
        return int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise args_error(key, value, "must be an integer") from None


def parse_float_arg(key: str, value: Any) -> float | None:
    """A float network arg (None stays None)."""
    if value is None:
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise args_error(key, value, "must be a number") from None
    if not math.isfinite(result):
        raise args_error(key, value, "must be a finite number")
    return result


def parse_block_list(key: str, value: Any, as_int: bool) -> list | None:
    """A list of exactly 25 comma-separated per-block values (ints or floats)."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        parsed = [int(str(v).strip()) if as_int else float(v) for v in items]
    except ValueError:
        kind = "integers" if as_int else "numbers"
        raise args_error(key, value, f"must be {NUM_TOTAL_BLOCKS} comma-separated {kind}") from None
    if len(parsed) != NUM_TOTAL_BLOCKS:
        raise args_error(key, value, f"must have exactly {NUM_TOTAL_BLOCKS} values (one per UNet block), "
                                     f"got {len(parsed)}")
    if as_int and any(v < 0 for v in parsed):
        raise args_error(key, value, "ranks must not be negative")
    return parsed


def lr_weight_preset(key: str, value: str) -> list[float]:
    """The 12 block weights of a preset name with an optional ``+<number>`` offset."""
    name, _, offset_text = value.strip().partition("+")
    try:
        offset = float(offset_text) if offset_text else 0.0
    except ValueError:
        raise args_error(key, value, "the part after '+' must be a number") from None
    last = NUM_OF_BLOCKS - 1
    xs = range(NUM_OF_BLOCKS)
    if name == "sine":
        base = [math.sin(math.pi / 2 * x / last) for x in xs]
    elif name == "cosine":
        base = [math.sin(math.pi / 2 * (last - x) / last) for x in xs]
    elif name == "linear":
        base = [x / last for x in xs]
    elif name == "reverse_linear":
        base = [(last - x) / last for x in xs]
    elif name == "zeros":
        base = [0.0] * NUM_OF_BLOCKS
    else:
        raise args_error(key, value, f"must be a preset ({', '.join(LR_WEIGHT_PRESETS)}, optionally "
                                     f"with +<number>) or a comma-separated list of up to {NUM_OF_BLOCKS} numbers")
    return [b + offset for b in base]


def parse_lr_weight_list(key: str, value: Any) -> list[float] | None:
    """``down_lr_weight``/``up_lr_weight``: 12 weights from a list or a preset.

    Empty list items mean 0; shorter lists are padded with 1.0, longer ones truncated to 12. A value
    without a comma is a preset name.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        weights = [float(v) for v in value]
    elif "," in str(value):
        try:
            weights = [float(s) if s.strip() else 0.0 for s in str(value).split(",")]
        except ValueError:
            raise args_error(key, value, "list items must be numbers") from None
    else:
        weights = lr_weight_preset(key, str(value))
    if len(weights) > NUM_OF_BLOCKS:
        logger.warning("%s has more than %d values; the rest are ignored", key, NUM_OF_BLOCKS)
        weights = weights[:NUM_OF_BLOCKS]
    elif len(weights) < NUM_OF_BLOCKS:
        logger.warning("%s has fewer than %d values; the missing ones are 1.0", key, NUM_OF_BLOCKS)
        weights = weights + [1.0] * (NUM_OF_BLOCKS - len(weights))
    return weights


def block_lr_weights(down: Any, mid: Any, up: Any, zero_threshold: float = 0.0
                     ) -> tuple[list[float] | None, float | None, list[float] | None]:
    """Parse the three block-lr args; weights ≤ ``zero_threshold`` become 0 (their blocks get no modules)."""
    down_w = parse_lr_weight_list("down_lr_weight", down)
    up_w = parse_lr_weight_list("up_lr_weight", up)
    mid_w = parse_float_arg("mid_lr_weight", mid)
    if down_w is not None:
        down_w = [w if w > zero_threshold else 0.0 for w in down_w]
    if up_w is not None:
        up_w = [w if w > zero_threshold else 0.0 for w in up_w]
    if mid_w is not None and mid_w <= zero_threshold:
        mid_w = 0.0
    return down_w, mid_w, up_w


def block_lr_weight_of(lora_name: str, down: Sequence[float] | None, mid: float | None,
                       up: Sequence[float] | None) -> float:
    """The lr multiplier of a UNet LoRA module (1.0 where nothing is set or for text-encoder names)."""
    idx = block_index(lora_name)
    if idx < 0:
        return 1.0
    if idx < MID_BLOCK_INDEX:
        return 1.0 if down is None else float(down[idx])
    if idx == MID_BLOCK_INDEX:
        return 1.0 if mid is None else float(mid)
    return 1.0 if up is None else float(up[idx - MID_BLOCK_INDEX - 1])


def parse_dropout_arg(key: str, value: Any) -> float | None:
    """A dropout probability in [0, 1) (None stays None); ``neuron_dropout`` is ``--network_dropout``."""
    p = parse_float_arg(key, value)
    if p is not None and not 0.0 <= p < 1.0:
        where = "--network_dropout " if key == "neuron_dropout" else f"--network_args {key}="
        raise UserError(f"{where}{value}: a dropout probability must be in [0, 1)")
    return p


def parse_dropouts(neuron_dropout: Any, kwargs: Mapping[str, Any],
                   keys: Sequence[str] = DROPOUT_ARGS) -> dict[str, float | None]:
    """``{key: probability or None}`` for the dropouts ``keys`` of :data:`DROPOUT_ARGS`, from the
    ``--network_args`` ``kwargs``; the neuron ``dropout`` is ``--network_dropout`` (``neuron_dropout``)
    when given, else ``dropout=``. UserError naming the option for a value outside [0, 1)."""
    parsed: dict[str, float | None] = {}
    if "dropout" in keys:
        neuron = parse_dropout_arg("neuron_dropout", neuron_dropout)
        parsed["dropout"] = neuron if neuron is not None else parse_dropout_arg("dropout", kwargs.get("dropout"))
    parsed.update({key: parse_dropout_arg(key, kwargs.get(key)) for key in keys if key != "dropout"})
    return parsed


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Silence the named loggers for the block (a check that runs again later says its warnings then)."""
    loggers = [logging.getLogger(name) for name in names]
    was = [log.disabled for log in loggers]
    for log in loggers:
        log.disabled = True
    try:
        yield
    finally:
        for log, disabled in zip(loggers, was):
            log.disabled = disabled


def check_known_args(kwargs: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raise a UserError for a ``--network_args`` key the module does not understand."""
    known = set(known)
    for key, value in kwargs.items():
        if key not in known:
            raise args_error(key, value, f"unknown key; known keys: {', '.join(sorted(known))}")


# ----------------------------------------------------------------------------------------------
# Weight maths


def lora_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The weight change ``up ∘ down`` (unscaled) of one LoRA module.

    Linear: ``U @ D``; 1×1 conv: the same reshaped to [out, in, 1, 1]; k×k conv:
    ``ΔW[o, i] = Σ_r U[o, r] · D[r, i]`` with D [r, in, k, k] and U [out, r, 1, 1].
    """
    if down.dim() == 2:
        return up.reshape(up.shape[0], -1) @ down
    u = up.reshape(up.shape[0], up.shape[1])
    return torch.einsum("or,rikl->oikl", u, down)


@torch.no_grad()
def max_norm_scale_(down: torch.Tensor, up: torch.Tensor, scale: float, max_norm: float,
                    device: torch.device | str | None = None) -> tuple[bool, float]:
    """Max-norm regularisation of one LoRA pair, in place (``--scale_weight_norms``, kohya's rule).

    With ``n = ‖scale · up∘down‖`` (Frobenius, computed in float32 on ``device``): when ``n > max_norm``
    both factors are multiplied by ``√(max_norm / n)``, so the scaled update has norm ``max_norm``;
    otherwise nothing changes (the ratio is taken against ``max(n, max_norm/2)``, as the reference does).
    Returns ``(scaled, norm after scaling)``.
    """
    f32 = {"device": device if device is not None else down.device, "dtype": torch.float32}
    norm = (lora_delta(down.detach().to(**f32), up.detach().to(**f32)) * scale).norm()
    clamped = norm.clamp(min=max_norm / 2)
    ratio = (torch.clamp(clamped, max=max_norm) / clamped).cpu()
    scaled = bool(ratio != 1)
    if scaled:
        factor = ratio**0.5
        down.mul_(factor)
        up.mul_(factor)
    return scaled, float(norm.cpu() * ratio)


def adapt_shape(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reshape a 2-D LoRA weight to [a, b, 1, 1] or back, when ``shape`` asks for the other form.

    SD2 ``proj_in``/``proj_out`` LoRAs are 4-D or 2-D depending on how the base model was loaded
    (file_formats.md §1.3); readers accept both.
    """
    if tensor.shape == shape:
        return tensor
    if tensor.dim() == 4 and len(shape) == 2 and tensor.shape[2:] == (1, 1) and tensor.shape[:2] == shape:
        return tensor.reshape(shape)
    if tensor.dim() == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1) and tensor.shape == shape[:2]:
        return tensor.reshape(shape)
    return tensor


# ----------------------------------------------------------------------------------------------
# Files and hashes


def load_state_dict_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a network file: ``.safetensors`` → (tensors, metadata); anything else → torch.load on CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"network weights file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
            return sd, metadata
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise UserError(f"cannot read network weights file {path}: {exc}") from exc
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"network weights file {path} does not hold a flat dict of tensors")
    return dict(sd), {}


def model_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of a network (file_formats.md §1.9).

    Both are computed over an in-memory safetensors serialization of ``state_dict`` with the
    metadata reduced to its ``ss_*`` keys: the model hash is the SHA-256 of the tensor-data section,
    the legacy hash the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB.
    """
    from safetensors.torch import save

    ss_meta = {k: str(v) for k, v in (metadata or {}).items() if k.startswith("ss_")}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = save(tensors, ss_meta)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def legacy_file_hash(path: str | os.PathLike) -> str:
    """A1111's legacy model hash of a file (SHA-256 of 64 KiB at 1 MiB, 8 hex digits); dirs → ``IsADirectory``."""
    path = Path(path)
    if path.is_dir():
        return "IsADirectory"
    if not path.is_file():
        return "NOFILE"
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex of a whole file (``ss_new_sd_model_hash``); dirs → ``IsADirectory``."""
    path = Path(path)
    if path.is_dir():
        return "IsADirectory"
    if not path.is_file():
        return "NOFILE"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state_dict_file(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                         metadata: Mapping[str, Any] | None = None) -> None:
    """Write a network file atomically.

    ``.safetensors``: tensors plus string metadata with ``sshs_model_hash``/``sshs_legacy_hash``
    added (the caller's dict is not changed); any other extension: ``torch.save`` of the dict, no
    metadata, in the legacy form AUTOMATIC1111's safe loader accepts (:mod:`library.pickle_files`).
    Every tensor is written with its own bytes only (never the larger storage it may be a view of).
    """
    from library.pickle_files import save_pickle, standalone

    path = Path(path)
    tensors = {k: standalone(v) for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            meta = {str(k): str(v) for k, v in (metadata or {}).items()}
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
            save_file(tensors, str(tmp), meta)
        else:
            save_pickle(tensors, tmp)


def network_metadata(network_module: str, network_dim: Any, network_alpha: Any,
                     network_args: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The minimal ``ss_*`` keys of a network file (the ``--no_metadata`` set, file_formats.md §1.8).

    Values are ``str()`` of what was given (``ss_network_dim`` is ``None`` when the module default
    was used); ``ss_network_args`` is the JSON of the raw ``--network_args`` strings, only when given.
    """
    meta = {"ss_network_module": network_module, "ss_network_dim": str(network_dim),
            "ss_network_alpha": str(network_alpha)}
    if network_args:
        meta["ss_network_args"] = json.dumps(dict(network_args))
    return meta


def group_by_module(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {key after the name: tensor}}``: a network state dict's keys grouped by the part before
    their first dot (``lora_unet_….lora_down.weight`` → module ``lora_unet_…``, key ``lora_down.weight``), in
    the order of the state dict."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        grouped.setdefault(name, {})[rest] = value
    return grouped


def dims_from_state_dict(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank (rows of ``lora_down``) and alpha (float; rank where the file has none)."""
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in weights_sd.items():
        if "." not in key:
            continue
        name = key.split(".", 1)[0]
        if key.endswith(".alpha"):
            alphas[name] = float(value)
        elif key.endswith("lora_down.weight"):
            dims[name] = int(value.shape[0])
    for name, dim in dims.items():
        alphas.setdefault(name, float(dim))  # pre-alpha files: alpha = rank (scale 1)
    return dims, {k: v for k, v in alphas.items() if k in dims}


def block_settings(network_dim: int, network_alpha: Any, conv_dim: int | None, conv_alpha: float | None,
                   kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Per-block ranks/alphas and lr weights from the ``--network_args`` (empty dict: not block mode).

    Block mode is on when any of ``block_dims``/``down_lr_weight``/``mid_lr_weight``/``up_lr_weight``
    is given; blocks whose lr weight is 0 get rank 0 (no modules).
    """
    block_dims_arg = kwargs.get("block_dims")
    lr_args = [kwargs.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")]
    if block_dims_arg is None and all(a is None for a in lr_args):
        ignored = [k for k in ("block_alphas", "conv_block_dims", "conv_block_alphas") if kwargs.get(k) is not None]
        if ignored:
            logger.warning("--network_args %s ignored: only used with block_dims or *_lr_weight",
                           ", ".join(ignored))
        return {}
    threshold = parse_float_arg("block_lr_zero_threshold", kwargs.get("block_lr_zero_threshold")) or 0.0
    down_w, mid_w, up_w = block_lr_weights(*lr_args, zero_threshold=threshold)
    block_dims = parse_block_list("block_dims", block_dims_arg, as_int=True) or [network_dim] * NUM_TOTAL_BLOCKS
    block_alphas = (parse_block_list("block_alphas", kwargs.get("block_alphas"), as_int=False)
                    or [network_alpha] * NUM_TOTAL_BLOCKS)
    conv_block_dims = parse_block_list("conv_block_dims", kwargs.get("conv_block_dims"), as_int=True)
    if conv_block_dims is not None:
        conv_block_alphas = (parse_block_list("conv_block_alphas", kwargs.get("conv_block_alphas"), as_int=False)
                             or [1.0 if conv_alpha is None else conv_alpha] * NUM_TOTAL_BLOCKS)
    elif conv_dim is not None:
        conv_block_dims = [conv_dim] * NUM_TOTAL_BLOCKS
        conv_block_alphas = [conv_alpha] * NUM_TOTAL_BLOCKS
    else:
        conv_block_alphas = None
    weights = ([(i, w) for i, w in enumerate(down_w or [])] + ([(MID_BLOCK_INDEX, mid_w)] if mid_w is not None else [])
               + [(MID_BLOCK_INDEX + 1 + i, w) for i, w in enumerate(up_w or [])])
    for idx, w in weights:
        if w == 0:
            block_dims[idx] = 0
            if conv_block_dims is not None:
                conv_block_dims[idx] = 0
    return {"block_dims": block_dims, "block_alphas": block_alphas, "conv_block_dims": conv_block_dims,
            "conv_block_alphas": conv_block_alphas, "lr_weights": (down_w, mid_w, up_w),
            "block_lr": any(a is not None for a in lr_args)}
