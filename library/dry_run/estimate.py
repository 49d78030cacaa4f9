"""What each method trains and where its memory goes, for ``--dry_run`` (on the meta model of
:mod:`library.dry_run.memory`; nothing is allocated).

The dtypes follow the training scripts exactly: LoRA keeps the UNet and VAE in the mixed-precision dtype
and the text encoder in fp32; DreamBooth / fine-tuning keep the trained UNet (and text encoder) in fp32
(the half dtype with ``--full_fp16`` / ``--full_bf16``) and the frozen parts in the mixed-precision dtype;
Textual Inversion trains the whole token-embedding matrix of an fp32 text encoder.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch

from library.dry_run import memory as mem
from library.config.arguments import latents_cached

METHOD_NAMES = {"network": "LoRA-family network (train_network.py)", "dreambooth": "DreamBooth (train_db.py)",
                "finetune": "fine-tuning (fine_tune.py)", "textual_inversion": "Textual Inversion",
                "xti": "Extended Textual Inversion (XTI)"}


@dataclass
class Trainable:
    """What a method trains on the meta model."""

    shapes: list[torch.Size]                 # every trained tensor (optimizer state is per tensor)
    parts: dict[str, int]                    # label -> trained element count
    groups: list[tuple[str, float | None]]   # optimizer groups: (name, lr or None = --learning_rate)
    dtype: torch.dtype                       # dtype of the trained weights (and their gradients)
    component_dtypes: dict[str, torch.dtype]  # "unet" / "text_encoder" / "vae" as placed on the device
    text_encoder_in_grad_path: bool          # the step backpropagates through the text encoder
    extra_weights: int = 0                   # trained elements that are not part of the base model (LoRA)
    added_embedding_rows: int = 0            # Textual Inversion: new token rows
    ema_elements: int = 0                    # elements an EMA would average
    network: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Trained elements."""
        return sum(s.numel() for s in self.shapes)


def text_encoder_trains(args: argparse.Namespace, method: str) -> bool:
    """Whether a full-model method trains the text encoder at all."""
    if method == "dreambooth":
        stop = getattr(args, "stop_text_encoder_training", None)
        return stop is None or stop > 0
    return bool(getattr(args, "train_text_encoder", False))


def _network(args: argparse.Namespace, meta: mem.MetaModel, weight_dtype: torch.dtype, half: bool) -> Trainable:
    from library.errors import UserError
    from library.config.arguments import parse_network_args
    from library.methods.network import import_network_module

    module = import_network_module(args.network_module)
    kwargs = parse_network_args(args.network_args)
    train_unet, train_te = not args.network_train_text_encoder_only, not args.network_train_unet_only
    te, unet = meta.text_encoder, meta.unet
    try:
        with torch.device("meta"):
            if args.network_weights and args.dim_from_weights:
                network, _ = module.create_network_from_weights(1.0, args.network_weights, meta.vae, te, unet,
                                                                **kwargs)
            else:
                network = module.create_network(1.0, args.network_dim, args.network_alpha, meta.vae, te, unet,
                                                neuron_dropout=args.network_dropout, **kwargs)
            network.apply_to(te, unet, train_te, train_unet)
            groups = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party network module may not build on meta tensors
        raise UserError(f"--dry_run: cannot build {args.network_module} on the meta device to count its "
                        f"parameters ({type(exc).__name__}: {exc})") from None
    groups = groups if isinstance(groups[0], dict) else [{"params": list(groups)}]
    params = [p for g in groups for p in g["params"]]
    parts = {}
    for label, loras in (("network: text encoder", getattr(network, "text_encoder_loras", None)),
                         ("network: UNet", getattr(network, "unet_loras", None))):
        if loras:
            parts[f"{label} ({len(loras)} modules)"] = mem.numel(p for lora in loras for p in lora.parameters())
    if not parts:
        parts["network"] = mem.numel(params)
    names = _group_names(len(groups), train_unet, train_te)
    return Trainable(shapes=[p.shape for p in params], parts=parts,
                     groups=[(n, g.get("lr")) for n, g in zip(names, groups)],
                     dtype=weight_dtype if half else torch.float32,
                     component_dtypes={"unet": weight_dtype, "text_encoder": torch.float32, "vae": weight_dtype},
                     text_encoder_in_grad_path=train_te, extra_weights=mem.numel(params),
                     ema_elements=mem.numel(params), network=network)


def _group_names(count: int, train_unet: bool, train_te: bool) -> list[str]:
    if count == 1:
        return ["text encoder" if train_te and not train_unet else "unet"]
    if count == 2 and train_te:
        return ["text encoder", "unet"]
    return [f"group {i}" for i in range(count)]


def _full_model(args: argparse.Namespace, method: str, meta: mem.MetaModel, weight_dtype: torch.dtype,
                half: bool) -> Trainable:
    trained_dtype = weight_dtype if half else torch.float32
    te_trains = text_encoder_trains(args, method)
    meta.unet.requires_grad_(True)
    params = list(meta.unet.parameters())
    parts = {"UNet (all weights)": mem.numel(params)}
    notes = []
    if te_trains:
        meta.text_encoder.requires_grad_(True)
        te_params = list(meta.text_encoder.parameters())
        params += te_params
        parts["text encoder (all weights)"] = mem.numel(te_params)
        stop = getattr(args, "stop_text_encoder_training", None)
        if stop:
            notes.append(f"the text encoder trains for the first {stop} steps only (its optimizer state stays)")
    groups: list[tuple[str, float | None]] = [("all", None)]
    if te_trains and getattr(args, "learning_rate_te", None) is not None:  # two optimizer groups, as trained
        groups = [("unet", None), ("text encoder", args.learning_rate_te)]
    return Trainable(shapes=[p.shape for p in params], parts=parts, groups=groups, dtype=trained_dtype,
                     component_dtypes={"unet": trained_dtype,
                                       "text_encoder": trained_dtype if te_trains else weight_dtype,
                                       "vae": weight_dtype},
                     text_encoder_in_grad_path=te_trains, ema_elements=mem.numel(params), notes=notes)


def _textual_inversion(args: argparse.Namespace, method: str, meta: mem.MetaModel, weight_dtype: torch.dtype,
                       half: bool) -> Trainable:
    from library.methods.textual_inversion import token_embedding

    embedding = token_embedding(meta.text_encoder)
    vectors = args.num_vectors_per_token
    added = vectors
    notes = []
    if method == "xti":
        from library.methods.xti import cross_attention_layers

        layers = len(cross_attention_layers(meta.unet))
        added += vectors * layers
        notes.append(f"XTI: {vectors} vector(s) × {layers} cross-attention layers; the text encoder runs once per "
                     "layer for every caption")
    rows, width = embedding.num_embeddings + added, embedding.embedding_dim
    embedding.weight.requires_grad_(True)
    trained_dtype = weight_dtype if half else torch.float32
    notes.append(f"the whole token-embedding matrix ({rows} × {width}) is the optimizer's parameter; only the "
                 f"{added} new row(s) change")
    return Trainable(shapes=[torch.Size((rows, width))], parts={f"token embeddings ({rows} × {width})": rows * width},
                     groups=[("embeddings", None)], dtype=trained_dtype,
                     component_dtypes={"unet": weight_dtype, "text_encoder": trained_dtype, "vae": weight_dtype},
                     text_encoder_in_grad_path=True, added_embedding_rows=added, ema_elements=added * width,
                     notes=notes)


def plan_trainable(args: argparse.Namespace, method: str, meta: mem.MetaModel) -> Trainable:
    """What ``method`` trains and how the model is placed (see the module docstring)."""
    weight_dtype = mem.PRECISION_DTYPES[args.mixed_precision]
    half = bool(args.full_fp16 or args.full_bf16)
    if method == "network":
        return _network(args, meta, weight_dtype, half)
    if method in ("dreambooth", "finetune"):
        return _full_model(args, method, meta, weight_dtype, half)
    if method in ("textual_inversion", "xti"):
        return _textual_inversion(args, method, meta, weight_dtype, half)
    raise ValueError(f"unknown method {method!r}")


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


def _context_rows(args: argparse.Namespace) -> tuple[int, int]:
    """(77-token chunks per caption, UNet context length)."""
    from library.data.tokens import chunk_count

    chunks = chunk_count(args.max_token_length)
    return chunks, 75 * chunks + 2


def estimate_memory(args: argparse.Namespace, method: str, meta: mem.MetaModel, trainable: Trainable,
                    buckets: list[tuple[tuple[int, int], int]], *, vae_in_step: bool,
                    device: mem.DeviceInfo) -> MemoryEstimate:
    """Bytes on ``device`` for training ``trainable`` over ``buckets`` ((width, height), batch) — each is
    run once through the meta UNet (and text encoder when gradients pass through it)."""
    weight_dtype = mem.PRECISION_DTYPES[args.mixed_precision]
    mixed = args.mixed_precision != "no"
    counts = {"unet": mem.numel(meta.unet.parameters()), "text_encoder": mem.numel(meta.text_encoder.parameters()),
              "vae": mem.numel(meta.vae.parameters())}
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
    from library.training.optim import parse_optimizer_args, resolve_optimizer_name

    optimizer = resolve_optimizer_name(args.optimizer_type, use_8bit_adam=args.use_8bit_adam,
                                       use_lion_optimizer=args.use_lion_optimizer)
    state_bytes, state_note = mem.optimizer_state_bytes(optimizer, parse_optimizer_args(args.optimizer_args),
                                                        trainable.shapes, trainable.dtype)
    lines.append(MemoryLine(f"optimizer state ({optimizer})", None, "", state_bytes, state_note))
    if mixed:
        copies = _autocast_copies(method, trainable, counts)
        if copies:
            lines.append(MemoryLine("autocast weight copies", copies, mem.DTYPE_NAMES[weight_dtype],
                                    copies * mem.element_size(weight_dtype), "fp32 weights cast for the backward pass"))
    if (getattr(args, "ema", False) or getattr(args, "save_ema", False)) and getattr(args, "ema_device", "same") != "cpu":
        lines.append(MemoryLine("EMA weights", trainable.ema_elements, "fp32", trainable.ema_elements * 4, "--ema"))

    rows = _activation_rows(args, method, meta, trainable, buckets, weight_dtype, vae_in_step)
    cache_phase = None
    if latents_cached(args) and buckets:
        largest = max(buckets, key=lambda b: b[0][0] * b[0][1])[0]
        vae_only = counts["vae"] * mem.element_size(weight_dtype)
        cache_phase = vae_only + mem.vae_encode_transient(meta, image_size=largest, batch=max(1, args.vae_batch_size),
                                                          dtype=weight_dtype)
        cache_phase += mem.CUDA_CONTEXT_BYTES if device.kind == "cuda" else 0
    notes = list(trainable.notes)
    if getattr(args, "cache_text_encoder_outputs", False) or getattr(args, "cache_text_encoder_outputs_to_disk", False):
        notes.append("text-encoder outputs are cached: the text encoder does not run during the steps")
    return MemoryEstimate(device=device, precision=args.mixed_precision, model_source=meta.source, components=counts,
                          lines=lines, activations=rows, gradient_checkpointing=bool(args.gradient_checkpointing),
                          overhead=mem.CUDA_CONTEXT_BYTES if device.kind == "cuda" else 0, cache_phase=cache_phase,
                          notes=notes)


def _autocast_copies(method: str, trainable: Trainable, counts: dict[str, int]) -> int:
    """Elements of fp32 weights that autocast casts and keeps for the backward pass."""
    own = trainable.count if trainable.dtype == torch.float32 else 0  # --full_fp16/bf16: already half
    if method == "network":  # the text encoder stays fp32 for networks
        return own + (counts["text_encoder"] if trainable.text_encoder_in_grad_path else 0)
    if trainable.dtype != torch.float32:
        return 0
    if method in ("dreambooth", "finetune"):
        return trainable.count
    return counts["text_encoder"]


def _activation_rows(args: argparse.Namespace, method: str, meta: mem.MetaModel, trainable: Trainable,
                     buckets: list[tuple[tuple[int, int], int]], dtype: torch.dtype,
                     vae_in_step: bool) -> list[ActivationRow]:
    chunks, context = _context_rows(args)
    te_cached = getattr(args, "cache_text_encoder_outputs", False) or getattr(args, "cache_text_encoder_outputs_to_disk",
                                                                                False)
    te_grad = trainable.text_encoder_in_grad_path and not te_cached
    mem.cast_meta(meta.unet, dtype)
    mem.cast_meta(meta.text_encoder, dtype)
    mem.cast_meta(meta.vae, dtype)
    network_params: list[torch.Tensor] = []
    if trainable.network is not None:
        trainable.network.to(dtype=dtype)
        network_params = list(trainable.network.parameters())
    scale = 2 ** (len(meta.vae.config.block_out_channels) - 1)
    sliced = bool(args.mem_eff_attn and not args.xformers)
    layers = 1
    if method == "xti":
        from library.methods.xti import cross_attention_layers

        layers = len(cross_attention_layers(meta.unet))
    rows = []
    for (width, height), batch in buckets:
        unet = mem.count_unet_activations(meta, latent_size=(width // scale, height // scale), batch=batch,
                                          context_len=context, dtype=dtype, cond_requires_grad=te_grad,
                                          sliced_attention=sliced, exclude=network_params)
        without, with_gc = unet.without_checkpointing(), unet.with_checkpointing()
        if te_grad:
            te = mem.count_text_encoder_activations(meta, rows=batch * chunks * layers, dtype=dtype,
                                                    exclude=network_params)
            without, with_gc = without + te.without_checkpointing(), with_gc + te.with_checkpointing()
        vae = mem.vae_encode_transient(meta, image_size=(width, height), batch=batch, dtype=dtype) if vae_in_step else 0
        rows.append(ActivationRow((width, height), batch, without, with_gc, vae))
    return rows
