"""The memory estimate of ``--dry_run`` (on the meta model of :mod:`library.dry_run.memory`; nothing is
allocated).

What is trained and in which dtypes the parts are placed comes from the method's
:class:`library.dry_run.plan.Trainable`; this module counts the bytes: weights, gradients, optimizer state,
autocast copies, EMA weights and, per bucket, the activations one training step saves for backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.dry_run import memory as mem
from library.dry_run.plan import Precision, Trainable, numel
from library.option_groups import DataOptions, EmaOptions, ModelOptions, OptimizerOptions


# ---- the estimate ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryLine:
    """One row of the estimate: what, how many elements, in which dtype, how many bytes."""

    label: str
    count: int | None
    dtype: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class ActivationRow:
    """Saved activations of one bucket resolution at its largest batch."""

    resolution: tuple[int, int]
    batch: int
    without_checkpointing: int
    with_checkpointing: int
    vae_transient: int


@dataclass
class MemoryEstimate:
    """The whole estimate (bytes)."""

    device: mem.DeviceInfo
    precision: str
    model_source: str
    components: dict[str, int]     # base-model parameter counts: unet / text_encoder / vae
    lines: list[MemoryLine]
    activations: list[ActivationRow]
    gradient_checkpointing: bool
    overhead: int
    cache_phase: int | None        # --cache_latents: peak while encoding before training
    notes: list[str]

    @property
    def static_bytes(self) -> int:
        """Weights, gradients, optimizer state and copies: present for the whole run."""
        return sum(line.bytes for line in self.lines)

    def activation_bytes(self, row: ActivationRow) -> int:
        """The step's dynamic peak at one resolution: saved activations (+ backward margin), or the VAE
        encoding when that is larger (it runs before the forward pass)."""
        saved = row.with_checkpointing if self.gradient_checkpointing else row.without_checkpointing
        return max(int(saved * (1 + mem.BACKWARD_MARGIN)), row.vae_transient)

    @property
    def peak_bytes(self) -> int:
        """Estimated peak on the device."""
        dynamic = max((self.activation_bytes(r) for r in self.activations), default=0)
        training = self.static_bytes + dynamic + self.overhead
        return max(training, self.cache_phase or 0)


def _context_rows(max_token_length: int | None) -> tuple[int, int]:
    """(77-token chunks per caption, UNet context length) for ``--max_token_length``."""
    from library.data.tokens import chunk_count

    chunks = chunk_count(max_token_length)
    return chunks, 75 * chunks + 2


def estimate_memory(meta: mem.MetaModel, trainable: Trainable, buckets: list[tuple[tuple[int, int], int]], *,
                    precision: Precision, model: ModelOptions, data: DataOptions, optimizer: OptimizerOptions,
                    ema: EmaOptions, text_encoder_cached: bool, vae_in_step: bool,
                    device: mem.DeviceInfo) -> MemoryEstimate:
    """Bytes on ``device`` for training ``trainable`` over ``buckets`` ((width, height), batch) — each is
    run once through the meta UNet (and text encoder when gradients pass through it).

    Reads --gradient_checkpointing, --mem_eff_attn, --xformers (``model``); --cache_latents[_to_disk],
    --vae_batch_size, --max_token_length (``data``); the optimizer options; --ema, --save_ema, --ema_device.
    ``text_encoder_cached``: --cache_text_encoder_outputs[_to_disk] (the text encoder does not run in the steps);
    ``vae_in_step``: the VAE encodes each batch (no cached or pre-computed latents)."""
    weight_dtype = precision.weight_dtype
    counts = {"unet": numel(meta.unet.parameters()), "text_encoder": numel(meta.text_encoder.parameters()),
              "vae": numel(meta.vae.parameters())}
    width = meta.text_encoder.config.hidden_size
    counts_on_device = dict(counts, text_encoder=counts["text_encoder"] + trainable.added_embedding_rows * width)
    names = {"unet": "UNet", "text_encoder": "text encoder", "vae": "VAE"}
    lines = []
    for key, label in names.items():
        dtype = trainable.component_dtypes[key]
        lines.append(MemoryLine(f"{label} weights", counts_on_device[key], mem.DTYPE_NAMES[dtype],
                                counts_on_device[key] * mem.element_size(dtype)))
    size = mem.element_size(trainable.dtype)
    if trainable.extra_weights:
        lines.append(MemoryLine("network weights", trainable.extra_weights, mem.DTYPE_NAMES[trainable.dtype],
                                trainable.extra_weights * size, "trained"))
    lines.append(MemoryLine("gradients", trainable.count, mem.DTYPE_NAMES[trainable.dtype], trainable.count * size))
    lines.append(_optimizer_line(optimizer, trainable))
    if precision.mixed and trainable.autocast_copies:
        copies = trainable.autocast_copies
        lines.append(MemoryLine("autocast weight copies", copies, mem.DTYPE_NAMES[weight_dtype],
                                copies * mem.element_size(weight_dtype), "fp32 weights cast for the backward pass"))
    if ema.enabled and ema.ema_device != "cpu":
        lines.append(MemoryLine("EMA weights", trainable.ema_elements, "fp32", trainable.ema_elements * 4, "--ema"))

    rows = _activation_rows(meta, trainable, buckets, dtype=weight_dtype, model=model,
                            max_token_length=data.max_token_length,
                            text_encoder_cached=text_encoder_cached, vae_in_step=vae_in_step)
    cache_phase = None
    if data.latents_cached and buckets:
        largest = max(buckets, key=lambda b: b[0][0] * b[0][1])[0]
        vae_only = counts["vae"] * mem.element_size(weight_dtype)
        cache_phase = vae_only + mem.vae_encode_transient(meta, image_size=largest, batch=max(1, data.vae_batch_size),
                                                          dtype=weight_dtype)
        cache_phase += mem.CUDA_CONTEXT_BYTES if device.kind == "cuda" else 0
    notes = list(trainable.notes)
    if text_encoder_cached:
        notes.append("text-encoder outputs are cached: the text encoder does not run during the steps")
    return MemoryEstimate(device=device, precision=precision.mixed_precision, model_source=meta.source,
                          components=counts, lines=lines, activations=rows,
                          gradient_checkpointing=bool(model.gradient_checkpointing),
                          overhead=mem.CUDA_CONTEXT_BYTES if device.kind == "cuda" else 0, cache_phase=cache_phase,
                          notes=notes)


def _optimizer_line(optimizer: OptimizerOptions, trainable: Trainable) -> MemoryLine:
    """The optimizer state of ``trainable`` (reads --optimizer_type, --use_8bit_adam, --use_lion_optimizer,
    --optimizer_args)."""
    from library.training.optim import parse_optimizer_args, resolve_optimizer_name

    name = resolve_optimizer_name(optimizer.optimizer_type, use_8bit_adam=optimizer.use_8bit_adam,
                                  use_lion_optimizer=optimizer.use_lion_optimizer)
    state_bytes, state_note = mem.optimizer_state_bytes(name, parse_optimizer_args(optimizer.optimizer_args),
                                                        trainable.shapes, trainable.dtype)
    return MemoryLine(f"optimizer state ({name})", None, "", state_bytes, state_note)


def _activation_rows(meta: mem.MetaModel, trainable: Trainable, buckets: list[tuple[tuple[int, int], int]], *,
                     dtype: torch.dtype, model: ModelOptions, max_token_length: int | None,
                     text_encoder_cached: bool, vae_in_step: bool) -> list[ActivationRow]:
    """Saved activations per bucket (reads --mem_eff_attn and --xformers from ``model``)."""
    chunks, context = _context_rows(max_token_length)
    te_grad = trainable.text_encoder_in_grad_path and not text_encoder_cached
    mem.cast_meta(meta.unet, dtype)
    mem.cast_meta(meta.text_encoder, dtype)
    mem.cast_meta(meta.vae, dtype)
    network_params: list[torch.Tensor] = []
    if trainable.network is not None:
        trainable.network.to(dtype=dtype)
        network_params = list(trainable.network.parameters())
    scale = 2 ** (len(meta.vae.config.block_out_channels) - 1)
    sliced = bool(model.mem_eff_attn and not model.xformers)
    rows = []
    for (width, height), batch in buckets:
        unet = mem.count_unet_activations(meta, latent_size=(width // scale, height // scale), batch=batch,
                                          context_len=context, dtype=dtype, cond_requires_grad=te_grad,
                                          sliced_attention=sliced, exclude=network_params)
        without, with_gc = unet.without_checkpointing(), unet.with_checkpointing()
        if te_grad:
            te = mem.count_text_encoder_activations(meta, rows=batch * chunks * trainable.text_encoder_runs,
                                                    dtype=dtype, exclude=network_params)
            without, with_gc = without + te.without_checkpointing(), with_gc + te.with_checkpointing()
        vae = mem.vae_encode_transient(meta, image_size=(width, height), batch=batch, dtype=dtype) if vae_in_step else 0
        rows.append(ActivationRow((width, height), batch, without, with_gc, vae))
    return rows
