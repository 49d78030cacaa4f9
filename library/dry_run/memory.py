"""The memory part of ``--dry_run``: parameter counts and a rough estimate of peak memory, without
loading a single weight.

The model is built from its configs (read from the checkpoint header, a diffusers folder's configs or a
preset) on PyTorch's ``meta`` device, where tensors have shapes and dtypes but no storage: building
and even running it allocates nothing. That gives exact parameter counts (LoRA networks are created
on the meta model the way the training script creates them) and, by running one training forward pass
on meta tensors, the exact set of tensors autograd saves for the backward pass at a given resolution and
batch size — the activations. Attention is counted as a fused kernel (PyTorch SDPA / xformers) keeps it:
query, key, value, output and the log-sum-exp, never the attention matrix (except ``--mem_eff_attn``,
whose sliced attention really keeps it). See docs/dry_run.md for the formula and its limits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from library.errors import UserError
from library.option_groups import ModelOptions

logger = logging.getLogger(__name__)

GIB = 2 ** 30
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CUDA_CONTEXT_BYTES = int(0.5 * GIB)   # CUDA context + allocator reserve, a typical figure
BACKWARD_MARGIN = 0.10                # gradients of activations alive during backward, on top of the saved set
VAE_TRANSIENT_TENSORS = 3             # live tensors of the largest size while the VAE encodes (no grad)

# Optimizer state per trainable element: (number of full-size states, bytes per element or None = the
# parameter's own dtype). Sources: the optimizers' step() code (torch, bitsandbytes, lion-pytorch,
# dadaptation, prodigyopt). AdaFactor is computed per tensor (factored second moments).
OPTIMIZER_STATES: dict[str, tuple[float, int | None]] = {
    "adamw": (2, None), "adam": (2, None), "nadam": (2, None), "radam": (2, None), "adamax": (2, None),
    "adamw8bit": (2, 1), "lion": (1, None), "lion8bit": (1, 1), "sgdnesterov": (1, None),
    "sgdnesterov8bit": (1, 1), "dadaptation": (3, None), "dadaptadam": (3, None), "dadaptadagrad": (3, None),
    "dadaptadan": (5, None), "dadaptadanip": (5, None), "dadaptsgd": (3, None), "dadaptlion": (2, None),
    "prodigy": (4, None), "adagrad": (1, None), "rmsprop": (1, None), "sgd": (0, None), "asgd": (2, None),
}


@dataclass
class MetaModel:
    """The UNet, text encoder and VAE of the run, built on the meta device, and where the configs came from."""

    unet: Any
    text_encoder: Any
    vae: Any
    configs: Any
    source: str


def model_configs(model: ModelOptions):
    """``(ModelConfigs, source note)`` of ``--pretrained_model_name_or_path`` from the header / configs only
    (also reads --v_parameterization, --reference_model and --v2)."""
    from library.models import detect
    from library.models.load import configs_from_diffusers_folder
    from library.models.presets import get_preset
    from library.models.statedict import open_state_dict

    spec = str(model.pretrained_model_name_or_path or "")
    if not spec:
        raise UserError("--pretrained_model_name_or_path is required (an ldm .ckpt/.safetensors file, "
                        "a diffusers folder, or a Hugging Face Hub id)")
    local = Path(os.path.expanduser(spec))
    v_param = bool(model.v_parameterization)
    if local.is_file():
        state = open_state_dict(local)  # lazy: header / pickle index only, no tensor is read
        family = detect.detect_ldm_family(state.shapes())
        if family not in ("sd1", "sd2"):
            raise UserError(f"{local}: not a Stable Diffusion 1.x/2.x checkpoint (found: {family})")
        if model.reference_model:
            configs = configs_from_diffusers_folder(Path(model.reference_model), v_param)
        else:
            configs = detect.infer_configs_from_ldm(state.shapes())
        return configs, "checkpoint header (tensor shapes)"
    if local.is_dir():
        return configs_from_diffusers_folder(local, v_param), "diffusers configs"
    preset = "sd2" if model.v2 else "sd1"
    return get_preset(preset), f"the {preset.upper()} architecture (the model is not a local file or folder)"


def build_meta_model(model: ModelOptions) -> MetaModel:
    """The three components of ``--pretrained_model_name_or_path`` with every tensor on the meta device
    (nothing allocated, nothing read)."""
    import warnings

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs, source = model_configs(model)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_config(configs.unet)
        vae = AutoencoderKL.from_config(configs.vae)
        te = CLIPTextModel(CLIPTextConfig(**configs.text_encoder))
    for module in (unet, vae, te):
        module.requires_grad_(False)
    return MetaModel(unet, te, vae, configs, source)


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype, device="meta").element_size()


# ---- optimizer state ------------------------------------------------------------------------------------

def _arg(optimizer_args: dict[str, Any], key: str, default: Any) -> Any:
    return optimizer_args.get(key, default)


def optimizer_state_bytes(name: str, optimizer_args: dict[str, Any], shapes: list[torch.Size],
                          param_dtype: torch.dtype) -> tuple[int, str]:
    """Bytes of optimizer state for trainable tensors of ``shapes`` and a note saying how they were counted.

    AdamW: 2 states in the parameter dtype; 8-bit variants: 1 byte per state; Lion: 1 state; SGD with
    Nesterov: 1 (momentum); plain SGD: 1 with momentum, else 0; D-Adaptation / Prodigy: 2-5; AdaFactor:
    row and column second moments for ≥2-D tensors (factored), a full one for the rest, plus a first
    moment when ``beta1`` is given. Unknown classes are counted as Adam-like (2 states)."""
    key = name.rsplit(".", 1)[-1].lower()
    total = sum(torch.Size(s).numel() for s in shapes)
    if key == "adafactor":
        beta1 = _arg(optimizer_args, "beta1", None)
        count = 0
        for shape in shapes:
            if len(shape) >= 2:
                count += torch.Size(shape[:-1]).numel() + torch.Size(shape[:-2] + shape[-1:]).numel()
            else:
                count += torch.Size(shape).numel()
            if beta1 is not None:
                count += torch.Size(shape).numel()
        return count * 4, "factored second moments" + (" + first moment" if beta1 is not None else "")
    if key == "sgd":
        momentum = float(_arg(optimizer_args, "momentum", 0) or 0)
        states, size = (1 if momentum else 0), None
    elif key == "rmsprop" and float(_arg(optimizer_args, "momentum", 0) or 0):
        states, size = 2, None
    elif key in OPTIMIZER_STATES:
        states, size = OPTIMIZER_STATES[key]
    else:
        states, size = 2, None
        note = f"{states} states per parameter (assumed Adam-like: unknown class)"
        return int(total * states * element_size(param_dtype)), note
    per = size if size is not None else element_size(param_dtype)
    note = f"{states:g} state(s) × {per} byte(s) per parameter"
    return int(total * states * per), note


# ---- activations: counting what autograd saves on the meta device ----------------------------------------

class _FusedAttention(torch.autograd.Function):
    """Attention that keeps what a fused kernel keeps for backward: q, k, v, the output and the row-wise
    log-sum-exp (never the attention matrix). Only used on meta tensors, for counting."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale):  # noqa: D102
        import torch.nn.functional as F

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - never run: counting only
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value), None, None, None, None


class _FusedAttentionMode(torch.overrides.TorchFunctionMode):
    """Routes ``scaled_dot_product_attention`` through :class:`_FusedAttention` (the meta device would
    otherwise use the math kernel, which saves the whole attention matrix)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            return _FusedAttention.apply(q, k, v, mask, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
                                         kwargs.get("scale"))
        return func(*args, **kwargs)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass
class SavedTensors:
    """Bytes autograd keeps for backward, split into what checkpointed units would keep."""

    outside: dict[int, int] = field(default_factory=dict)     # storage -> bytes, outside checkpointed units
    units: list[dict[int, int]] = field(default_factory=list)  # per checkpointed unit
    unit_inputs: dict[int, int] = field(default_factory=dict)  # inputs a checkpoint keeps instead
    exclude: set[int] = field(default_factory=set)             # parameter storages (counted as weights)
    seen: list[torch.Tensor] = field(default_factory=list)     # every recorded tensor, kept alive (meta: free)

    def key(self, t: torch.Tensor) -> int:
        """The storage key of ``t``, which stays its own: ``t`` is kept alive so that no later tensor's storage
        can reuse the address (the count would then depend on when Python frees tensors)."""
        self.seen.append(t)
        return _storage_key(t)

    def pack(self, target: dict[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """A pack hook recording each saved tensor's storage once."""
        def hook(t: torch.Tensor) -> torch.Tensor:
            key = self.key(t)
            if key not in self.exclude:
                target[key] = max(target.get(key, 0), t.untyped_storage().nbytes())
            return t
        return hook

    def without_checkpointing(self) -> int:
        """Every saved tensor, each storage once."""
        merged = dict(self.outside)
        for unit in self.units:
            merged.update(unit)
        return sum(merged.values())

    def with_checkpointing(self) -> int:
        """Saved tensors outside the units + the inputs each unit's checkpoint keeps + the largest unit,
        recomputed during backward."""
        held = sum(v for k, v in self.unit_inputs.items() if k not in self.outside)
        return sum(self.outside.values()) + held + max((sum(u.values()) for u in self.units), default=0)


def _unit_call(saved: SavedTensors, module: Any, args: tuple, kwargs: dict) -> Any:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and saved.key(value) not in saved.exclude:
            saved.unit_inputs[saved.key(value)] = value.untyped_storage().nbytes()
    unit: dict[int, int] = {}
    saved.units.append(unit)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack(unit), lambda t: t):
        return module(*args, **kwargs)


def count_unet_activations(meta: MetaModel, *, latent_size: tuple[int, int], batch: int, context_len: int,
                           dtype: torch.dtype, cond_requires_grad: bool, sliced_attention: bool,
                           exclude: Iterable[torch.Tensor] = ()) -> SavedTensors:
    """Run one UNet forward on meta tensors (in ``dtype``) with the trainable parameters as they are set
    and count the saved tensors; checkpointed units are those diffusers' gradient checkpointing wraps.
    ``exclude``: further weights (a network's) that are counted as weights, not activations."""
    unet = meta.unet
    saved = SavedTensors(exclude={_storage_key(t) for t in [*unet.parameters(), *unet.buffers(), *exclude]})

    def checkpoint(module, *args, **kwargs):
        return _unit_call(saved, module, args, kwargs)

    unet.enable_gradient_checkpointing(checkpoint)
    if sliced_attention:
        heads = [m.sliceable_head_dim for m in unet.modules() if hasattr(m, "sliceable_head_dim")]
        unet.set_attention_slice("auto" if heads and min(heads) >= 2 else "max")
    try:
        width, height = latent_size
        sample = torch.empty(batch, unet.config.in_channels, height, width, device="meta", dtype=dtype)
        cond = torch.empty(batch, context_len, unet.config.cross_attention_dim, device="meta", dtype=dtype,
                           requires_grad=cond_requires_grad)
        timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
        with _FusedAttentionMode(), torch.autograd.graph.saved_tensors_hooks(saved.pack(saved.outside), lambda t: t):
            unet(sample, timesteps, cond)
    finally:
        unet.disable_gradient_checkpointing()
        if sliced_attention:
            unet.set_attn_processor(_default_processor())
    return saved


def _default_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def count_text_encoder_activations(meta: MetaModel, *, rows: int, dtype: torch.dtype,
                                   exclude: Iterable[torch.Tensor] = ()) -> SavedTensors:
    """One text-encoder forward of ``rows`` 77-token sequences on meta tensors; each encoder layer is a
    checkpointed unit (what transformers' gradient checkpointing wraps)."""
    te = meta.text_encoder
    saved = SavedTensors(exclude={_storage_key(t) for t in [*te.parameters(), *te.buffers(), *exclude]})
    layers = list(getattr(getattr(getattr(te, "text_model", te), "encoder", None), "layers", []))
    contexts: list[Any] = []

    def enter(module, args, kwargs):
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                saved.unit_inputs[saved.key(value)] = value.untyped_storage().nbytes()
        unit: dict[int, int] = {}
        saved.units.append(unit)
        ctx = torch.autograd.graph.saved_tensors_hooks(saved.pack(unit), lambda t: t)
        ctx.__enter__()
        contexts.append(ctx)

    def leave(module, args, kwargs, output):
        contexts.pop().__exit__(None, None, None)

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter, with_kwargs=True),
                                                layer.register_forward_hook(leave, with_kwargs=True))]
    try:
        ids = torch.zeros(rows, 77, dtype=torch.long, device="meta")
        with _FusedAttentionMode(), torch.autograd.graph.saved_tensors_hooks(saved.pack(saved.outside), lambda t: t):
            te(ids)
    finally:
        for handle in handles:
            handle.remove()
    return saved


def vae_encode_transient(meta: MetaModel, *, image_size: tuple[int, int], batch: int, dtype: torch.dtype) -> int:
    """Rough peak of encoding a batch with the VAE (no gradients): the input plus
    :data:`VAE_TRANSIENT_TENSORS` tensors of the largest intermediate size."""
    largest = 0

    def hook(module, args, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    leaves = [m for m in meta.vae.encoder.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        width, height = image_size
        with torch.no_grad(), _FusedAttentionMode():
            meta.vae.encoder(torch.empty(batch, 3, height, width, device="meta", dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    size = element_size(dtype)
    return (batch * 3 * width * height + VAE_TRANSIENT_TENSORS * largest) * size


def cast_meta(module: Any, dtype: torch.dtype) -> None:
    """Cast a meta module (silencing diffusers' advice about keeping modules in fp32)."""
    import warnings

    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module.to(dtype=dtype)
    finally:
        quiet.setLevel(level)


# ---- the device ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    """The device training would run on and its memory."""

    name: str
    kind: str        # "cuda" or "cpu"
    total_bytes: int | None


def training_device() -> DeviceInfo:
    """What accelerate would pick: the local rank's CUDA device when there is one, else the CPU (RAM)."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0") or 0) % max(1, torch.cuda.device_count())
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo(f"cuda:{index} ({props.name})", "cuda", int(props.total_memory))
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return DeviceInfo("cpu (system memory)", "cpu", total)
