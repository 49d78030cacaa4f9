"""OFT networks (``--network_module networks.oft``): Orthogonal Finetuning, block-diagonal form.

Each wrapped layer's weight W [out, in(, kh, kw)] is rotated on its output axis. The outputs are split
into ``num_blocks`` blocks of ``block_size = out / num_blocks`` rows; block k of the merged weight is ::

    Q_k = B_k − B_kᵀ                       B = oft_blocks [num_blocks, block_size, block_size]
    Q   ← Q · (min(‖Q‖, c) + 1e-8) / (‖Q‖ + 1e-8)      ‖Q‖: Frobenius norm of all blocks, c = alpha·out
    R_k = (I + Q_k)(I − Q_k)⁻¹              (Cayley transform: R_k is orthogonal)
    W'_k = (I + m·(R_k − I))ᵀ · W_k = W_k + m·(R_kᵀ W_k − W_k)          m: the multiplier

which is what AUTOMATIC1111's built-in Lora extension (``network_oft.py``), kohya-ss's own OFT and
LyCORIS's diag-OFT compute (the einsum ``"k n m, k n ... -> k m ..."``, i.e. R_kᵀ·W_k). ``alpha`` = 0
means no constraint. The same layers, names and options as :mod:`networks.lora`: ``--network_dim`` is
the number of blocks (kohya's meaning; it must divide the output size of every layer),
``--network_alpha`` the constraint, ``conv_dim``/``conv_alpha`` the same for 3×3 convolutions, block
dims/alphas/lr weights, module rules and ``module_dropout``. Initialisation: B = 0, so R = I.

Files: ``<name>.oft_blocks`` and ``<name>.alpha`` (a float scalar), ``<name>`` a kohya LoRA module name.
ComfyUI reads ``alpha`` as an absolute bound on ‖Q‖ (no × out) and applies the strength twice
(W + m²·(RᵀW − W)). So that a file looks the same in both UIs, :meth:`OFTModule.file_tensors` saves the
blocks with the constraint already applied and, where needed, a raised alpha (≥ ‖Q‖ of the saved
blocks): neither UI's constraint then changes anything. docs/train_network.md (OFT) has the details.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

from library.errors import UserError
from networks.lora import LoRANetwork, network_from_args, network_from_file, resolve_network_args
from networks.lora_common import check_known_args, group_by_module, load_state_dict_file, quiet_loggers
from networks.lora_module import LoRAModule, match_dtype

logger = logging.getLogger(__name__)

OFT_KEY = "oft_blocks"
OFT_NETWORK_ARGS = (
    "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "module_dropout", "module_rules",
)
NO_DROPOUT = ("dropout", "rank_dropout")
DEFAULT_ALPHA = 1e-3  # kohya's default constraint when create_network gets none
# Relative margin of a saved alpha over the saved ‖Q‖ (float32 norms differ by far less between devices).
_ALPHA_MARGIN = 1e-4


# ----------------------------------------------------------------------------------------------
# Maths (shared by the module, the tools and the tests' documentation)


def constraint_of(alpha: float | torch.Tensor | None, out_features: int) -> float | None:
    """The bound on ‖Q‖ as AUTOMATIC1111/kohya/LyCORIS read a file: ``alpha · out``; None for no alpha or 0."""
    if alpha is None:
        return None
    value = float(alpha.detach().float()) if isinstance(alpha, torch.Tensor) else float(alpha)
    return value * out_features if value > 0 else None


def skew(blocks: torch.Tensor, constraint: float | None) -> torch.Tensor:
    """``Q = B − Bᵀ`` per block, its Frobenius norm (over all blocks) clamped to ``constraint``."""
    q = blocks - blocks.transpose(1, 2)
    if constraint is None:
        return q
    norm = torch.norm(q.flatten())
    return q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))


def rotations(blocks: torch.Tensor, constraint: float | None) -> torch.Tensor:
    """The orthogonal blocks ``R_k = (I + Q_k)(I − Q_k)⁻¹`` in float32, [num_blocks, size, size]."""
    q = skew(blocks.float(), constraint)
    eye = torch.eye(q.shape[1], device=q.device, dtype=q.dtype)
    return torch.matmul(eye + q, (eye - q).inverse())


def rotate_weight(weight: torch.Tensor, rots: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """``W'_k = (I + m·(R_k − I))ᵀ W_k`` for the output blocks of ``weight`` (float32, weight's shape)."""
    num_blocks, size, _ = rots.shape
    eye = torch.eye(size, device=rots.device, dtype=rots.dtype)
    mixed = eye + multiplier * (rots - eye) if multiplier != 1.0 else rots
    blocks = weight.float().reshape(num_blocks, size, -1)
    return torch.einsum("knm,knp->kmp", mixed, blocks).reshape(weight.shape)


def oft_delta(weight: torch.Tensor, blocks: torch.Tensor, alpha: float | torch.Tensor | None,
              multiplier: float = 1.0) -> torch.Tensor:
    """``m·(RᵀW − W)`` for one layer weight and one module's file tensors, float32 (the UIs' update)."""
    rots = rotations(blocks.to(weight.device), constraint_of(alpha, weight.shape[0]))
    base = weight.float()
    return (rotate_weight(base, rots) - base) * multiplier


def ui_safe_alpha(blocks: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """``alpha`` as saved beside ``blocks`` (already in their file dtype): raised where needed to at least
    ``‖Q‖`` (plus a margin), so that ComfyUI's bound (alpha itself) never shrinks Q; AUTOMATIC1111's bound
    (alpha · out) is then larger still."""
    b = blocks.detach().to("cpu", torch.float64)
    needed = (float(torch.norm((b - b.transpose(1, 2)).flatten())) + 1e-8) * (1.0 + _ALPHA_MARGIN)
    value = torch.tensor(max(alpha, needed), dtype=torch.float64).to(dtype)
    if float(value) < needed:  # rounded down by a half-precision dtype
        value = torch.tensor(needed * (1.0 + 2.0 * torch.finfo(dtype).eps), dtype=torch.float64).to(dtype)
    return value


# ----------------------------------------------------------------------------------------------
# The module


class OFTModule(LoRAModule):
    """One OFT module on a Linear or Conv2d: ``org(x) + op(x, W' − W)``, i.e. the layer with its rotated
    weight (module docstring)."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | int | torch.Tensor | None = DEFAULT_ALPHA, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 init_weights: bool = True) -> None:
        """``lora_dim`` is the number of blocks (it must divide the layer's outputs); ``alpha`` the
        constraint (None/0: none). ``dropout``/``rank_dropout`` are not supported (must be None)."""
        out = int(org_module.weight.shape[0])
        blocks = int(lora_dim)
        if blocks < 1 or out % blocks:
            divisors = [d for d in range(1, out + 1) if out % d == 0]
            raise UserError(f"OFT module {lora_name}: {blocks} blocks do not divide its {out} output channels; "
                            "choose a block count (--network_dim, conv_dim, block_dims or a module-rule dim) that "
                            f"divides every layer's output size (here: {', '.join(map(str, divisors[:16]))})")
        if dropout is not None or rank_dropout is not None:
            raise ValueError("OFT modules support module_dropout only")
        self.num_blocks, self.block_size, self.out_features = blocks, out // blocks, out
        super().__init__(lora_name, org_module, multiplier, blocks, 1, module_dropout=module_dropout,
                         init_weights=init_weights)
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float())
        self.register_buffer("alpha", torch.tensor(float(alpha or 0.0)))
        self.scale = 1.0

    def _build_layers(self, org: nn.Module) -> None:
        """``oft_blocks`` [num_blocks, block_size, block_size]."""
        size = self.block_size
        self.oft_blocks = nn.Parameter(torch.empty(self.num_blocks, size, size))

    def reset_parameters(self) -> None:
        """Zero blocks: R = I, so a fresh module changes nothing."""
        nn.init.zeros_(self.oft_blocks)

    @property
    def constraint(self) -> float | None:
        """The bound on ‖Q‖: alpha · out (None when alpha is 0)."""
        return constraint_of(self.alpha, self.out_features)

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The trained tensor by file key name."""
        return {OFT_KEY: self.oft_blocks}

    def rotated_weight(self) -> torch.Tensor:
        """The wrapped weight rotated at this module's multiplier, float32 (differentiable in the blocks)."""
        rots = rotations(self.oft_blocks, self.constraint)
        return rotate_weight(self.org_module.weight.detach(), rots, self.multiplier)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the module adds to the layer's output: ``op(x, W' − W)`` (the layer's own forward, bias
        included, runs first; so the module chains with other networks hooked into the same layer)."""
        weight = self.rotated_weight() - self.org_module.weight.detach().float()
        x = match_dtype(x, weight)
        return self.layer_op(x, weight.to(x.dtype))

    @torch.no_grad()
    def merge_to(self, sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """``W ← W + m·(RᵀW − W)`` (float32, stored as ``dtype``), then unhook. ``sd``: this module's tensors
        from a file (``oft_blocks``, optionally ``alpha``); None: its own."""
        target = self.org_module.weight
        where = target.device if device is None else torch.device(device)
        blocks, alpha = (self.oft_blocks, self.alpha) if sd is None else (sd[OFT_KEY], sd.get("alpha"))
        base = target.detach().to(where, torch.float32)
        merged = base + oft_delta(base, blocks.detach().to(where, torch.float32), alpha, self.multiplier)
        self.org_module.weight.data = merged.to(target.dtype if dtype is None else dtype)
        self.restore()

    @torch.no_grad()
    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``oft_blocks`` with the constraint applied (B·f, so that Q·f is the Q the module trains with) and
        the UI-safe alpha (:func:`ui_safe_alpha`), on the CPU in ``dtype`` (None: as trained)."""
        blocks = self.oft_blocks.detach()
        constraint = self.constraint
        if constraint is not None:
            q = blocks.float() - blocks.float().transpose(1, 2)
            norm = torch.norm(q.flatten())
            factor = (torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8)
            if float(factor) != 1.0:
                blocks = (blocks.float() * factor).to(blocks.dtype)
        dtype = blocks.dtype if dtype is None else dtype
        blocks = blocks.to("cpu").to(dtype).contiguous()
        return {OFT_KEY: blocks, "alpha": ui_safe_alpha(blocks, float(self.alpha.float()), dtype)}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Take the incoming alpha as it is (dtype included)."""
        self.take_file_alpha(state_dict, prefix)
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)


class OFTNetwork(LoRANetwork):
    """A :class:`~networks.lora.LoRANetwork` of :class:`OFTModule` that saves UI-safe files."""

    @property
    def apply_max_norm_regularization(self):
        """Not offered (``--scale_weight_norms`` is refused before training): alpha bounds the rotation."""
        raise AttributeError("OFT networks have no max-norm regularisation; --network_alpha bounds the rotation")

    def file_names_to_ours(self, weights_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """kohya's ``oft_unet_…`` names read as ``lora_unet_…`` (:func:`kohya_names_to_lora`)."""
        return kohya_names_to_lora(weights_sd)

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every module's :meth:`OFTModule.file_tensors` (what ``save_weights`` writes)."""
        return {f"{m.lora_name}.{k}": v for m in self.all_loras() for k, v in m.file_tensors(dtype).items()}


# ----------------------------------------------------------------------------------------------
# One module of a file (the LoRA tools' view, networks/lora_files.py)


class OFTModuleWeights:
    """The ``oft_blocks`` and alpha of one module as stored in a file. Offers what the LoRA tools use to
    merge a module: ``delta`` (needs the layer weight), ``fits``, ``signature``, ``check_finite``, ``rank``."""

    kind = "oft"
    is_dora = False
    needs_base = True  # the update depends on the layer's weight

    def __init__(self, name: str, blocks: torch.Tensor, alpha: torch.Tensor | None) -> None:
        self.name, self.blocks, self.alpha = name, blocks, alpha
        self.parts = {OFT_KEY: blocks}

    @property
    def rank(self) -> int:
        """The number of blocks."""
        return int(self.blocks.shape[0])

    @property
    def alpha_value(self) -> float:
        """The constraint value (0 without an alpha key: no constraint)."""
        return float(self.alpha.detach().float()) if self.alpha is not None else 0.0

    @property
    def out_features(self) -> int:
        """Output features/channels of the wrapped layer (blocks × block size)."""
        return int(self.blocks.shape[0] * self.blocks.shape[1])

    in_features = None  # an OFT file does not tell the input size
    kernel = None

    def signature(self) -> tuple[int, None, None]:
        """(out, None, None): only the output size is known."""
        return self.out_features, None, None

    def fits(self, layer_signature: tuple[int, int, tuple[int, int]]) -> bool:
        """Whether the blocks tile the layer's outputs."""
        return self.out_features == layer_signature[0]

    def check_finite(self, source: str | os.PathLike) -> None:
        """UserError when the blocks hold NaN/inf (a diverged training run)."""
        if not bool(torch.isfinite(self.blocks).all()):
            raise UserError(f"{source}: OFT module {self.name} contains NaN or infinite weights (training "
                            "diverged?); check the file with networks/check_lora_weights.py")

    def delta(self, multiplier: float = 1.0, dtype: torch.dtype | None = None,
              base: torch.Tensor | None = None) -> torch.Tensor:
        """``multiplier · (RᵀW − W)`` in float32 for the layer weight ``base`` (blocks first rounded to
        ``dtype`` when given)."""
        if base is None:
            raise ValueError(f"OFT module {self.name}: the layer weight is needed to compute its change")
        blocks = self.blocks.to(dtype) if dtype is not None else self.blocks
        return oft_delta(base.detach(), blocks.float(), self.alpha, multiplier)


def oft_module_weights(name: str, tensors: Mapping[str, torch.Tensor], where: str) -> OFTModuleWeights:
    """The checked weights of one OFT module (keys after ``<name>.``: ``oft_blocks`` and optionally
    ``alpha``); UserError naming ``where`` for other keys or blocks that are not [n, s, s]."""
    others = sorted(set(tensors) - {OFT_KEY, "alpha"})
    if others:
        raise UserError(f"{where}: OFT module {name} also has '{others[0]}' (only oft_blocks and alpha are "
                        "supported: no LyCORIS rescale/DoRA or mixed modules)")
    blocks = tensors[OFT_KEY]
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2] or blocks.shape[0] < 1:
        raise UserError(f"{where}: OFT module {name} has oft_blocks of shape {tuple(blocks.shape)}; expected "
                        "[num_blocks, block_size, block_size] (see docs/train_network.md, OFT)")
    alpha = tensors.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise UserError(f"{where}: OFT module {name} has an alpha of shape {tuple(alpha.shape)}; expected a scalar")
    return OFTModuleWeights(name, blocks, alpha)


# ----------------------------------------------------------------------------------------------
# Creating networks


def kohya_names_to_lora(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with kohya's OFT prefix ``oft_unet_`` renamed to ``lora_unet_`` (the rest of the names
    are the same diffusers paths)."""
    prefix = "oft_unet_"
    return {("lora_unet_" + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in weights_sd.items()}


def _parse(network_dim: int | None, network_alpha: float | None, neuron_dropout: Any,
           kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The options, checked (UserError naming the option); defaults: 4 blocks, constraint 1e-3."""
    if neuron_dropout is not None:
        raise UserError(f"--network_dropout {neuron_dropout}: OFT has no neuron dropout (it rotates whole "
                        "weights); leave it out, or use --network_args module_dropout=P")
    for key in NO_DROPOUT:
        if kwargs.get(key) is not None:
            raise UserError(f"--network_args {key}={kwargs[key]}: OFT supports module_dropout only")
    check_known_args(kwargs, OFT_NETWORK_ARGS)
    kwargs = dict(kwargs)
    alpha = DEFAULT_ALPHA if network_alpha is None else network_alpha
    if kwargs.get("conv_dim") is not None and kwargs.get("conv_alpha") is None:
        kwargs["conv_alpha"] = str(alpha)  # the 3×3 convolutions get the same constraint unless told
    parsed = resolve_network_args(network_dim, alpha, None, kwargs)
    if parsed["network_alpha"] >= 1:
        logger.warning("OFT constraint --network_alpha %g is loose (‖Q‖ ≤ alpha × outputs); kohya suggests "
                       "about 1e-3", parsed["network_alpha"])
    return parsed


def check_network_args(network_dim: int | None, network_alpha: float | None, neuron_dropout: Any = None,
                       **kwargs: Any) -> None:
    """Check the options :func:`create_network` would get without building anything (UserError)."""
    with quiet_loggers(__name__, "networks.lora_common"):  # warnings are said once, by create_network
        _parse(network_dim, network_alpha, neuron_dropout, kwargs)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: nn.Module | None,
                   text_encoder: nn.Module | None, unet: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any) -> OFTNetwork:
    """A fresh OFT network: ``network_dim`` blocks per layer (None → 4), constraint ``network_alpha``
    (None → 1e-3, 0 → none). ``--network_args``: conv_dim, conv_alpha (default: network_alpha), block_dims,
    block_alphas, conv_block_dims, conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold,
    module_dropout, module_rules (as networks.lora; dims are block counts, alphas constraints)."""
    parsed = _parse(network_dim, network_alpha, neuron_dropout, kwargs)
    return network_from_args(OFTNetwork, parsed, text_encoder, unet, multiplier, module_class=OFTModule)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: nn.Module | None,
                                text_encoder: nn.Module | None, unet: nn.Module | None,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: Any) -> tuple[OFTNetwork, dict[str, torch.Tensor]]:
    """An OFT network shaped like a file (block count and alpha per module); returns ``(network, weights)``
    without loading them. kohya's own ``oft_unet_…`` names are read as ``lora_unet_…``. Of ``kwargs``
    ``module_dropout`` is used."""
    if weights_sd is None:
        weights_sd, _ = load_state_dict_file(file)
    weights = kohya_names_to_lora(weights_sd)
    modules = {n: p for n, p in group_by_module(weights).items() if OFT_KEY in p}
    if not modules:
        raise UserError(f"--network_weights {file}: has no OFT modules (no '<module>.oft_blocks' keys); use the "
                        "--network_module the file was trained with")
    dims, alphas = {}, {}
    for name, parts in modules.items():
        checked = oft_module_weights(name, parts, f"--network_weights {file}")
        dims[name], alphas[name] = checked.rank, checked.alpha_value
    network = network_from_file(OFTNetwork, dims, alphas, text_encoder, unet, multiplier, for_inference, kwargs,
                                dropouts=("module_dropout",), module_class=OFTModule)
    return network, weights


__all__ = ["OFTModule", "OFTNetwork", "OFTModuleWeights", "create_network", "create_network_from_weights",
           "check_network_args", "oft_delta", "rotations", "rotate_weight", "constraint_of", "ui_safe_alpha"]
