"""Extended Textual Inversion (XTI, "P+"; train_textual_inversion_XTI.py): one set of token vectors per
UNet cross-attention layer (training_behaviour.md §21, file_formats.md §4).

For every layer L of the UNet's cross-attention transformers (16 in SD1/SD2, named by their ldm block:
``IN01 … OUT11``) the tokens ``tok_L, tok1_L, … tok<n-1>_L`` are added and trained. A caption is encoded
once per layer with its token string replaced by that layer's tokens, and each cross-attention layer
attends to its own encoding. The layer routing is done by attention processors that wrap the installed
ones (SDPA, xformers, …) and pick their layer's states from ``cross_attention_kwargs`` — the UNet's own
forward is untouched, so gradient checkpointing and every diffusers version keep working.

Deliberate differences from the reference (documented in docs/train_textual_inversion.md):
``--weights`` works (its 16·n rows are assigned layer-major; the reference always fails an assertion);
vector v of every layer starts from init token ``v mod len(init tokens)`` (the reference's mapping
ignores the vector index for n > 1); ``--max_token_length`` and sample images are supported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from library.data.tokens import encode_tokens, tokenize_caption
from library.errors import UserError
from library.methods.textual_inversion import (TextualInversionMethod, add_token_rows, freeze_and_place,
                                               initial_vectors, read_weights_file, token_embedding,
                                               token_strings)
from library.option_groups import EmbeddingOptions

logger = logging.getLogger(__name__)

XTI_FORMATS = ("pt", "ckpt", "safetensors")
SD_LAYER_NAMES = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06",
                  "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
STATES_KWARG = "xti_states"


def _layers_per_block(unet: Any) -> int:
    value = unet.config.layers_per_block
    if not isinstance(value, int):
        if len(set(value)) != 1:
            raise UserError("XTI needs a UNet with the same number of layers in every block")
        value = value[0]
    return int(value)


def cross_attention_layers(unet: Any) -> list[tuple[str, str]]:
    """``(ldm layer name, diffusers module path)`` of every cross-attention transformer, in the order the
    UNet runs them. Names follow the ldm block index: SD1/SD2 give exactly :data:`SD_LAYER_NAMES`."""
    per_block = _layers_per_block(unet)
    layers = []
    for i, block in enumerate(unet.down_blocks):
        for j, _ in enumerate(getattr(block, "attentions", None) or []):
            layers.append((f"IN{1 + i * (per_block + 1) + j:02d}", f"down_blocks.{i}.attentions.{j}"))
    for j, _ in enumerate(getattr(unet.mid_block, "attentions", None) or []):
        layers.append(("MID" if j == 0 else f"MID{j}", f"mid_block.attentions.{j}"))
    for i, block in enumerate(unet.up_blocks):
        for j, _ in enumerate(getattr(block, "attentions", None) or []):
            layers.append((f"OUT{i * (per_block + 1) + j:02d}", f"up_blocks.{i}.attentions.{j}"))
    if not layers:
        raise UserError("XTI needs a UNet with cross-attention layers")
    return layers


class LayerRoutedAttention:
    """An attention processor that, given ``xti_states`` (layers, B, L, D), attends to the entry of its own
    layer instead of the UNet's ``encoder_hidden_states`` (self-attention processors get ``layer=None``
    and ignore it). Everything else is the wrapped processor's work."""

    def __init__(self, inner: Any, layer: int | None):
        self.inner, self.layer = inner, layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, xti_states: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if xti_states is not None and self.layer is not None:
            encoder_hidden_states = xti_states[self.layer]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def install_layer_routing(unet: Any, layers: Sequence[tuple[str, str]]) -> None:
    """Wrap every attention processor of ``unet`` in :class:`LayerRoutedAttention` (cross-attention ones
    with their layer index). Call it after xformers / SDPA has been chosen."""
    index_of = {path: i for i, (_, path) in enumerate(layers)}
    processors = {}
    for name, processor in unet.attn_processors.items():
        inner = processor.inner if isinstance(processor, LayerRoutedAttention) else processor
        layer = None
        if ".attn2." in name:
            owner = name.split(".transformer_blocks.")[0]
            layer = index_of.get(owner)
        processors[name] = LayerRoutedAttention(inner, layer)
    unet.set_attn_processor(processors)


def layer_token_strings(token_string: str, num_vectors: int, layer_names: Sequence[str]) -> list[str]:
    """The XTI tokens, layer-major: for each layer L ``tok_L, tok1_L, … tok<n-1>_L``."""
    plain = token_strings(token_string, num_vectors)
    return [f"{token}_{layer}" for layer in layer_names for token in plain]


def layer_captions(captions: Sequence[str], token_string: str, num_vectors: int,
                   layer_names: Sequence[str]) -> list[str]:
    """Every caption once per layer (layer-major, then batch order) with the expanded token string
    ``tok tok1 …`` replaced by that layer's tokens."""
    plain = token_strings(token_string, num_vectors)
    joined = " ".join(plain)
    return [caption.replace(joined, " ".join(f"{t}_{layer}" for t in plain))
            for layer in layer_names for caption in captions]


def read_xti_file(path: str | Path, layer_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The per-layer vectors of an XTI file (safetensors, or a torch pickle of the same dict)."""
    data = read_weights_file(path)
    if not isinstance(data, dict) or set(data) != set(layer_names) or not all(
            isinstance(v, torch.Tensor) and v.dim() == 2 for v in data.values()):
        keys = sorted(data)[:4] if isinstance(data, dict) else type(data).__name__
        raise UserError(f"--weights {path}: not an XTI embedding for this UNet (expected {len(layer_names)} "
                        f"tensors named {layer_names[0]} … {layer_names[-1]}, found {keys})")
    return data


def initial_layer_vectors(tokenizer: Any, embedding: torch.nn.Embedding, num_vectors: int,
                          layer_names: Sequence[str], *, init_word: str | None, weights: str | None,
                          seed: int) -> torch.Tensor:
    """Starting rows [layers·n, D], layer-major: from ``--weights`` (an XTI file), else every layer starts
    from the same n vectors (``--init_word`` or random, as plain Textual Inversion)."""
    dim = embedding.weight.shape[1]
    if weights:
        data = read_xti_file(weights, layer_names)
        rows = torch.cat([data[name] for name in layer_names])
        if rows.shape != (len(layer_names) * num_vectors, dim):
            got = tuple(data[layer_names[0]].shape)
            raise UserError(f"--weights {weights}: each layer has vectors of shape {got}, but this run needs "
                            f"({num_vectors}, {dim}) (--num_vectors_per_token; SD1 768, SD2 1024)")
        return rows.to(embedding.weight.dtype)
    vectors = initial_vectors(tokenizer, embedding, num_vectors, init_word=init_word, weights=None, seed=seed)
    return vectors.repeat(len(layer_names), 1)


def prepare_xti(model: Any, tokenizer: Any, embedding: EmbeddingOptions, *, seed: int, gradient_checkpointing: bool,
                device: torch.device, weight_dtype: torch.dtype, vae_dtype: torch.dtype,
                full_half: bool) -> tuple[list[str], list[int]]:
    """Add the plain and per-layer tokens of ``embedding`` (--token_string, --num_vectors_per_token),
    initialise the per-layer rows (--weights, else --init_word, else random with ``seed``), route each
    cross-attention layer to its own conditioning, freeze and place the model (the other arguments:
    :func:`~library.methods.textual_inversion.freeze_and_place`). Returns (layer names, XTI token ids)."""
    layers = cross_attention_layers(model.unet)
    names = [name for name, _ in layers]
    if len(names) != len(SD_LAYER_NAMES):
        logger.warning("this UNet has %d cross-attention layers (SD1/SD2 have 16): the XTI file will hold %d "
                       "entries", len(names), len(names))
    vectors = embedding.num_vectors_per_token
    plain = token_strings(embedding.token_string, vectors)
    ids = add_token_rows(model, tokenizer, plain + layer_token_strings(embedding.token_string, vectors, names))
    xti_ids = ids[len(plain):]
    table = token_embedding(model.text_encoder)
    start = initial_layer_vectors(tokenizer, table, vectors, names, init_word=embedding.init_word,
                                  weights=embedding.weights, seed=seed)
    with torch.no_grad():
        table.weight[xti_ids[0]:xti_ids[0] + len(xti_ids)] = start
        # the plain tokens never reach the encoder (captions use the layer tokens); keep them deterministic
        table.weight[ids[0]:ids[0] + len(plain)] = start[:len(plain)]
    freeze_and_place(model, gradient_checkpointing=gradient_checkpointing, device=device, weight_dtype=weight_dtype,
                     vae_dtype=vae_dtype, full_half=full_half)
    install_layer_routing(model.unet, layers)
    return names, xti_ids


def write_xti_file(path: Path, vectors: dict[str, torch.Tensor], save_format: str) -> Path:
    """Write ``{layer name: [n, D]}`` atomically as safetensors or a torch pickle (``.pt`` / ``.ckpt``, in
    the legacy form of :mod:`library.pickle_files`); each tensor holds only its own rows."""
    from library.fileio import atomic_path
    from library.pickle_files import save_pickle, standalone

    vectors = {k: standalone(v) for k, v in vectors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if save_format == "safetensors":
            from safetensors.torch import save_file

            save_file(vectors, str(tmp))
        else:
            save_pickle(vectors, tmp)
    return path


class XTIMethod(TextualInversionMethod):
    """Train the per-layer token rows; everything else is frozen (rows below them are restored each step)."""

    name = "xti"

    def __init__(self, *, layer_names: Sequence[str], num_vectors: int, **kwargs: Any):
        """``token_ids`` are the XTI ids (layer-major); see :class:`TextualInversionMethod` for the rest."""
        super().__init__(**kwargs)
        self.layer_names, self.num_vectors = list(layer_names), num_vectors

    def layer_vectors(self) -> dict[str, torch.Tensor]:
        """The trained vectors as ``{layer name: [n, D]}``."""
        rows = self.vectors()
        n = self.num_vectors
        return {name: rows[i * n:(i + 1) * n] for i, name in enumerate(self.layer_names)}

    def encode_layers(self, captions: Sequence[str]) -> torch.Tensor:
        """Per-layer conditioning (layers, B, L, D) of ``captions`` (already token-expanded)."""
        variants = layer_captions(captions, self.token_string, self.num_vectors, self.layer_names)
        tokenizer = self.model.tokenizer
        ids = torch.stack([tokenize_caption(tokenizer, c, self.max_token_length) for c in variants])
        states = encode_tokens(self.model.text_encoder, ids.to(self.device), self.clip_skip, self.max_token_length)
        return states.view(len(self.layer_names), len(captions), *states.shape[1:])

    def conditioning(self, batch: dict[str, Any]) -> torch.Tensor:
        """(layers, B, L, D) hidden states, with gradients into the XTI rows."""
        with torch.enable_grad():
            return self.encode_layers(batch["captions"])

    def unet_forward(self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
        """The UNet's prediction with each cross-attention layer attending to its own entry of ``cond``."""
        cond = cond.to(dtype)
        return unet(noisy, timesteps, cond[0], cross_attention_kwargs={STATES_KWARG: cond}).sample

    def save(self, output_dir: Path, name: str, *, epoch: int, step: int, final: bool) -> Path:
        """Write ``output_dir/name.<pt|ckpt|safetensors>``: one [n, D] tensor per layer name."""
        vectors = self.layer_vectors()
        if self.save_dtype is not None:
            vectors = {k: v.to(self.save_dtype) for k, v in vectors.items()}
        return write_xti_file(Path(output_dir) / f"{name}.{self.save_format}", vectors, self.save_format)


def dry_run_plan(embedding: EmbeddingOptions, layout: Any) -> Any:
    """XTI's part of ``--dry_run``: Textual Inversion's plan with one vector set per UNet cross-attention layer
    (see :func:`library.methods.textual_inversion.embedding_dry_run_plan`)."""
    from library.methods.textual_inversion import embedding_dry_run_plan

    return embedding_dry_run_plan(embedding, layout, method="xti", title="Extended Textual Inversion (XTI)",
                                  layer_count=lambda unet: len(cross_attention_layers(unet)))
