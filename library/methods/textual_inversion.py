"""Textual Inversion (train_textual_inversion.py): new tokens are added to the tokenizer and only their rows
of the text encoder's token-embedding matrix train; the UNet and the rest of the text encoder stay frozen.

As in the reference (training_behaviour.md §20) the whole embedding matrix is the optimizer's parameter
(so clipping and optimizer moments see it all) and after every optimizer step every row below the first
new id is copied back from the original, so those rows stay bit-identical. The result is a small
embedding file (file_formats.md §3): safetensors with ``emb_params`` [n, D] and a ``modelspec`` header,
or ``.pt`` / ``.ckpt`` in AUTOMATIC1111's ``string_to_param`` layout.

Under accelerate's FSDP config the token-embedding module is what is sharded (library/training/sharding.py):
the matrix is split by rows over the processes, and :func:`restore_rows` copies back the old rows of each
process's own shard. Under ``--deepspeed`` the module is what the engine holds (stages 0-2 keep the matrix
whole on every process; ZeRO-3 partitions it and :func:`restore_rows` gathers it for the copy).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from library.data.tokens import encode_tokens
from library.errors import UserError
from library.modelspec import HeaderFields
from library.option_groups import EmbeddingOptions

from library.methods.base import MethodBase
from library.output_safety import OutputLayout
from library.training.te_cache import TextEncoderUse

logger = logging.getLogger(__name__)

EMBEDDING_FORMATS = ("pt", "ckpt", "safetensors")
#: Textual Inversion (and XTI) train new rows of the text encoder's embedding for the whole run
TEXT_ENCODER_USE = TextEncoderUse(steps=None, why="Textual Inversion trains embeddings inside the text encoder")

OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]

# 19 entries: "cropped" and "close-up" appear twice, as in the reference (doubling their odds)
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}",
    "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
]


def add_textual_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    """``--token_string``, ``--num_vectors_per_token``, ``--init_word``, ``--weights`` and the templates."""
    g = parser.add_argument_group("Textual Inversion")
    g.add_argument("--token_string", type=str, default=None,
                   help="the new token (must not be in the tokenizer yet); captions must contain it unless a "
                        "template option is used; also the default output name")
    g.add_argument("--num_vectors_per_token", type=int, default=1,
                   help="vectors per token: tokens <tok>, <tok>1, ... <tok>N-1 are added")
    g.add_argument("--init_word", type=str, default=None,
                   help="initialise the vectors from this text's token embeddings (cycled when counts differ)")
    g.add_argument("--weights", type=str, default=None,
                   help="continue from an embedding file (.safetensors/.pt/.ckpt; same vector count)")
    g.add_argument("--use_object_template", action="store_true",
                   help="ignore captions: random 'a photo of a <token>' style templates")
    g.add_argument("--use_style_template", action="store_true",
                   help="ignore captions: random 'a painting in the style of <token>' templates")


def token_strings(token_string: str, num_vectors: int) -> list[str]:
    """``tok``, ``tok1``, … ``tok<n-1>`` (§20.1)."""
    return [token_string] + [f"{token_string}{i}" for i in range(1, num_vectors)]


def check_options(token_string: str | None, num_vectors: int) -> str:
    """Validate ``--token_string`` / ``--num_vectors_per_token``; returns the token string."""
    if not token_string or not token_string.strip():
        raise UserError("--token_string is required (the new token the embedding is learned for)")
    if any(c.isspace() for c in token_string) or "," in token_string:
        raise UserError(f"--token_string {token_string!r}: use one word without spaces or commas")
    if num_vectors < 1:
        raise UserError(f"--num_vectors_per_token {num_vectors}: must be at least 1")
    return token_string


def caption_replacements(token_string: str, num_vectors: int, *, object_template: bool,
                         style_template: bool) -> dict[str, str | list[str]]:
    """What the dataset does to every caption (§20.4): a random template (object wins over style), or the
    token string expanded to all n tokens (plain substring replacement, n > 1 only)."""
    joined = " ".join(token_strings(token_string, num_vectors))
    if object_template or style_template:
        templates = OBJECT_TEMPLATES if object_template else STYLE_TEMPLATES
        return {"": [t.format(joined) for t in templates]}
    if num_vectors > 1:
        return {token_string: joined}
    return {}


def warn_captions_without_token(group: Any, token_string: str) -> int:
    """Log a warning when training captions lack the token string (nothing is learned from them);
    returns how many lack it."""
    entries = [e for ds in group.datasets for e in ds.entries if not e.is_reg]
    missing = [e for e in entries if token_string not in (e.caption or "")]
    if missing:
        logger.warning("%d of %d training caption(s) do not contain %r, e.g. %s: nothing is learned from them "
                       "(put the token in the captions or use --use_object_template / --use_style_template)",
                       len(missing), len(entries), token_string, missing[0].key)
    return len(missing)


def expand_prompt(token_string: str, num_vectors: int):
    """A prompt rewriter for sample prompts: the token string becomes all n tokens."""
    joined = " ".join(token_strings(token_string, num_vectors))

    def transform(prompt: str) -> str:
        return prompt.replace(token_string, joined) if num_vectors > 1 and prompt else prompt

    return transform


def _in_vocabulary(tokenizer: Any, token: str) -> bool:
    vocab = tokenizer.get_vocab()
    return token in vocab or f"{token}</w>" in vocab or token.lower() in vocab or f"{token.lower()}</w>" in vocab


def add_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to the tokenizer; each must be new, and their ids are the last, contiguous ones."""
    known = [t for t in tokens if _in_vocabulary(tokenizer, t)]
    if known:
        raise UserError(f"--token_string: {', '.join(known)} is already a token of the tokenizer; choose a rare "
                        "made-up word (e.g. 'zqxdog')")
    before = len(tokenizer)
    added = tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if added != len(tokens) or ids != list(range(before, before + len(tokens))):
        raise UserError(f"--token_string: the tokenizer did not add {tokens} as new tokens")
    return ids


def read_weights_file(path: str | Path) -> Any:
    """The contents of a ``--weights`` file: a safetensors dict, or a torch pickle loaded weights-only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise UserError(f"--weights {path}: cannot read it ({str(exc).splitlines()[0][:160]})") from None


def read_embedding_file(path: str | Path) -> torch.Tensor:
    """Vectors [n, D] from an embedding file: safetensors (``emb_params`` or the first tensor), kohya's
    ``.pt`` ``{"emb_params": T}``, AUTOMATIC1111's ``string_to_param`` layout, or diffusers' ``{token: T}``."""
    data = read_weights_file(path)
    if isinstance(data, dict) and "string_to_param" in data:
        data = data["string_to_param"]
        data = getattr(data, "_parameters", data)
    if isinstance(data, dict):
        if "emb_params" in data:
            data = data["emb_params"]
        elif data:
            data = next(iter(data.values()))
    if not isinstance(data, torch.Tensor) or data.dim() not in (1, 2):
        raise UserError(f"--weights {path}: not an embedding file (expected emb_params or string_to_param)")
    return data.detach().reshape(1, -1) if data.dim() == 1 else data.detach()


def write_embedding_file(path: Path, vectors: torch.Tensor, save_format: str, *, token_string: str, step: int,
                         metadata: dict[str, str] | None = None) -> Path:
    """Write ``vectors`` atomically: safetensors ``{"emb_params": T}`` (+ metadata) or a ``.pt``/``.ckpt``
    in AUTOMATIC1111's layout ``{"string_to_token", "string_to_param": {"*": T}, "name", "step", ...}``,
    pickled in the form its safe loader accepts (:mod:`library.pickle_files`). Only the vectors' own
    bytes are written, never the embedding table they may be a view of."""
    from library.fileio import atomic_path
    from library.pickle_files import save_pickle, standalone

    vectors = standalone(vectors)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if save_format == "safetensors":
            from safetensors.torch import save_file

            save_file({"emb_params": vectors}, str(tmp), metadata=metadata)
        else:
            save_pickle({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": token_string,
                         "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp)
    return path


def token_embedding(text_encoder: Any) -> torch.nn.Embedding:
    """The text encoder's token-embedding module."""
    return text_encoder.get_input_embeddings()


def initial_vectors(tokenizer: Any, embedding: torch.nn.Embedding, num_vectors: int, *, init_word: str | None,
                    weights: str | None, seed: int) -> torch.Tensor:
    """The starting rows [n, D]: ``--weights``, else ``--init_word`` (init token ``i mod len``), else random
    rows with the existing rows' per-dimension mean and spread (seeded by the run seed)."""
    table = embedding.weight.detach()
    if weights:
        vectors = read_embedding_file(weights)
        if vectors.shape[0] != num_vectors:
            raise UserError(f"--weights {weights}: it has {vectors.shape[0]} vector(s) but "
                            f"--num_vectors_per_token is {num_vectors}")
        if vectors.shape[1] != table.shape[1]:
            raise UserError(f"--weights {weights}: vectors of size {vectors.shape[1]}, but this model's text "
                            f"encoder uses {table.shape[1]} (SD1 768, SD2 1024)")
        return vectors.to(table.dtype)
    if init_word is not None:
        ids = tokenizer.encode(init_word, add_special_tokens=False)
        if not ids:
            raise UserError(f"--init_word {init_word!r}: gives no tokens")
        if len(ids) > 1 and len(ids) != num_vectors:
            logger.info("--init_word %r has %d token(s) for %d vector(s): they are cycled/truncated", init_word,
                        len(ids), num_vectors)
        return torch.stack([table[ids[i % len(ids)]] for i in range(num_vectors)]).clone()
    generator = torch.Generator().manual_seed(seed)
    base = table.float().cpu()
    noise = torch.randn(num_vectors, table.shape[1], generator=generator)
    return (base.mean(0) + noise * base.std(0)).to(table.dtype)


def output_layout(save_model_as: str) -> OutputLayout:
    """``<name>.safetensors`` / ``.pt`` / ``.ckpt`` embedding files (XTI too)."""
    return OutputLayout("embedding", f".{save_model_as}")


class TextualInversionMethod(MethodBase):
    """Train the rows of new tokens in the text encoder's token-embedding matrix."""

    name = "textual_inversion"

    def __init__(self, *, model: Any, token_string: str, token_ids: list[int], clip_skip: int | None,
                 max_token_length: int | None, save_format: str, save_dtype: torch.dtype | None,
                 device: torch.device, gradient_checkpointing: bool = False,
                 header: HeaderFields | None = None):
        """Call :func:`prepare_textual_inversion` first (it adds the tokens and sets the vectors).
        ``header``: the run's :class:`library.modelspec.HeaderFields` (:func:`library.modelspec.run_fields`),
        for the ``modelspec`` header of ``.safetensors`` files (default: titled with the file's stem)."""
        if save_format not in EMBEDDING_FORMATS:
            raise UserError(f"--save_model_as {save_format}: expected one of {', '.join(EMBEDDING_FORMATS)}")
        self.model, self.token_string, self.token_ids = model, token_string, token_ids
        self.clip_skip, self.max_token_length = clip_skip, max_token_length
        self.save_format, self.save_dtype, self.device = save_format, save_dtype, device
        self.gradient_checkpointing = gradient_checkpointing
        self.header = header
        self.embedding = token_embedding(model.text_encoder)
        self.first_id = token_ids[0]
        self.original_rows = self.embedding.weight.detach()[:self.first_id].clone()

    def vectors(self) -> torch.Tensor:
        """The current trained vectors [n, D]."""
        return self.embedding.weight.detach()[self.first_id:self.first_id + len(self.token_ids)]

    def param_groups(self) -> list[dict[str, Any]]:
        """The whole token-embedding matrix, at ``--learning_rate``."""
        return [{"params": [self.embedding.weight]}]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The new rows only (the others always equal the base model's)."""
        return {"emb_params": self.vectors().clone()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put saved rows back (``--resume``)."""
        rows = state.get("emb_params")
        if rows is None or tuple(rows.shape) != tuple(self.vectors().shape):
            got = None if rows is None else tuple(rows.shape)
            raise UserError(f"--resume: the saved embedding {got} does not fit this run "
                            f"({tuple(self.vectors().shape)}); same --num_vectors_per_token and model?")
        with torch.no_grad():
            self.embedding.weight[self.first_id:self.first_id + len(self.token_ids)] = rows.to(
                self.embedding.weight.device, self.embedding.weight.dtype)

    def set_train(self, training: bool) -> None:
        """Text encoder in train mode while training; the UNet too only with gradient checkpointing."""
        self.model.text_encoder.train(training)
        self.model.unet.train(training and self.gradient_checkpointing)

    def conditioning(self, batch: dict[str, Any]) -> torch.Tensor:
        """Text-encoder hidden states with gradients (they flow back into the embedding rows)."""
        with torch.enable_grad():
            return encode_tokens(self.model.text_encoder, batch["input_ids"].to(self.device), self.clip_skip,
                                 self.max_token_length)

    def after_step(self, global_step: int) -> None:
        """Copy every row below the first new id back from the original, so only new rows change."""
        restore_rows(self.embedding.weight, self.original_rows)

    def save(self, output_dir: Path, name: str, *, epoch: int, step: int, final: bool) -> Path:
        """Write ``output_dir/name.<pt|ckpt|safetensors>`` with the trained vectors in ``--save_precision``."""
        vectors = self.vectors()
        if self.save_dtype is not None:
            vectors = vectors.to(self.save_dtype)
        path = Path(output_dir) / f"{name}.{self.save_format}"
        meta = None
        if self.save_format == "safetensors":
            fields = self.header if self.header is not None else HeaderFields(title=name)
            configs = self.model.configs
            meta = fields.header(v2=configs.v2, v_parameterization=configs.v_parameterization,
                                 adapter="textual-inversion")
        return write_embedding_file(path, vectors, self.save_format, token_string=self.token_string, step=step,
                                    metadata=meta)


def shard_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(rows this process holds, index of its first row)``: the whole matrix and 0, or for an FSDP2-sharded
    matrix (a DTensor split by rows: library/training/sharding.py) the local shard and its offset (FSDP2
    splits as ``torch.chunk``: ``ceil(rows / processes)`` rows per process, the last ones fewer or none)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return weight, 0
    if len(weight.placements) != 1 or weight.placements[0] != Shard(0):
        raise RuntimeError(f"token embedding sharded as {weight.placements}, expected rows over one mesh dimension")
    local, rows = weight.to_local(), weight.shape[0]
    chunk = -(-rows // weight.device_mesh.size())
    offset = min(weight.device_mesh.get_local_rank() * chunk, rows)
    if local.shape[0] != min(chunk, rows - offset):
        raise RuntimeError(f"token embedding shard of {local.shape[0]} rows at {offset} of {rows}: not a row chunk")
    return local, offset


@torch.no_grad()
def restore_rows(weight: torch.Tensor, original: torch.Tensor) -> None:
    """``weight[:len(original)] = original`` in place; for an FSDP2-sharded matrix every process writes the
    rows of its own shard (:func:`shard_rows`). A matrix partitioned by DeepSpeed ZeRO-3 (it has a ``ds_id``)
    is gathered, restored on the first process and partitioned again from there: every process calls this."""
    if hasattr(weight, "ds_id"):
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([weight], modifier_rank=0):
            weight[:original.shape[0]] = original.to(weight.device, weight.dtype)
        return
    local, offset = shard_rows(weight)
    stop = min(offset + local.shape[0], original.shape[0])
    if stop > offset:
        local[:stop - offset] = original[offset:stop].to(local.device, local.dtype)


def add_token_rows(model: Any, tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add ``tokens`` (all new) to the tokenizer and grow the text encoder's embedding matrix to match;
    returns their ids. The new rows hold whatever the resize left there until they are initialised."""
    rows = token_embedding(model.text_encoder).num_embeddings
    if rows != len(tokenizer):
        raise UserError(f"the text encoder has {rows} token embeddings but the tokenizer {len(tokenizer)} tokens; "
                        "Textual Inversion needs them to match (--v2 for SD2 models?)")
    ids = add_tokens(tokenizer, tokens)
    model.tokenizer = tokenizer
    model.text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return ids


def freeze_and_place(model: Any, *, gradient_checkpointing: bool, device: torch.device, weight_dtype: torch.dtype,
                     vae_dtype: torch.dtype, full_half: bool) -> None:
    """Freeze everything but the token-embedding matrix and place the parts: UNet in ``weight_dtype``, VAE
    in ``vae_dtype`` (float32 with --no_half_vae), the text encoder in float32, or ``weight_dtype`` with
    ``full_half`` (--full_fp16 / --full_bf16); ``gradient_checkpointing`` (--gradient_checkpointing) for
    the UNet and the text encoder."""
    from library.models.placement import place

    te = model.text_encoder
    model.unet.requires_grad_(False)
    model.vae.requires_grad_(False)
    model.vae.eval()
    te.requires_grad_(False)
    token_embedding(te).weight.requires_grad_(True)
    if gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        te.gradient_checkpointing_enable()
    place(model.unet, device, weight_dtype)
    place(te, device, weight_dtype if full_half else torch.float32)
    place(model.vae, device, vae_dtype)


def prepare_textual_inversion(model: Any, tokenizer: Any, embedding: EmbeddingOptions, *, seed: int,
                              gradient_checkpointing: bool, device: torch.device, weight_dtype: torch.dtype,
                              vae_dtype: torch.dtype, full_half: bool) -> list[int]:
    """Add the tokens of ``embedding`` (--token_string, --num_vectors_per_token), resize the embedding matrix,
    initialise the new rows (--weights, else --init_word, else random with ``seed``: :func:`initial_vectors`),
    freeze everything else and place the parts (:func:`freeze_and_place`, which the other arguments go to).
    Returns the new token ids."""
    ids = add_token_rows(model, tokenizer, token_strings(embedding.token_string, embedding.num_vectors_per_token))
    table = token_embedding(model.text_encoder)
    start = initial_vectors(tokenizer, table, len(ids), init_word=embedding.init_word, weights=embedding.weights,
                            seed=seed)
    with torch.no_grad():
        table.weight[ids[0]:ids[0] + len(ids)] = start.to(table.weight.dtype)
    freeze_and_place(model, gradient_checkpointing=gradient_checkpointing, device=device, weight_dtype=weight_dtype,
                     vae_dtype=vae_dtype, full_half=full_half)
    return ids


def embedding_dry_run_plan(embedding: EmbeddingOptions, layout: OutputLayout, *, method: str, title: str,
                           layer_count: Any = None) -> Any:
    """The ``--dry_run`` plan (a :class:`library.dry_run.plan.DryRunPlan`) of Textual Inversion and, with
    ``layer_count(unet)`` (the vector sets per token), of XTI. ``embedding`` is the
    :class:`~library.option_groups.EmbeddingOptions` (reads --token_string, --num_vectors_per_token). The
    whole token-embedding matrix is the optimizer's parameter, as in training; only the new rows change."""
    from library.dry_run.plan import DryRunPlan, Precision, Trainable, numel

    vectors = embedding.num_vectors_per_token

    def trainable(meta: Any, precision: Precision) -> Trainable:
        table = token_embedding(meta.text_encoder)
        added, runs, notes = vectors, 1, []
        if layer_count is not None:
            runs = layer_count(meta.unet)
            added += vectors * runs
            notes.append(f"XTI: {vectors} vector(s) × {runs} cross-attention layers; the text encoder runs once per "
                         "layer for every caption")
        rows, width = table.num_embeddings + added, table.embedding_dim
        table.weight.requires_grad_(True)
        trained_dtype = precision.trained_dtype
        notes.append(f"the whole token-embedding matrix ({rows} × {width}) is the optimizer's parameter; only the "
                     f"{added} new row(s) change")
        copies = numel(meta.text_encoder.parameters()) if trained_dtype == torch.float32 else 0
        return Trainable(shapes=[torch.Size((rows, width))],
                         parts={f"token embeddings ({rows} × {width})": rows * width},
                         groups=[("embeddings", None)], dtype=trained_dtype,
                         component_dtypes={"unet": precision.weight_dtype, "text_encoder": trained_dtype,
                                           "vae": precision.weight_dtype},
                         text_encoder_in_grad_path=True, autocast_copies=copies, added_embedding_rows=added,
                         text_encoder_runs=runs, ema_elements=added * width, notes=notes)

    def prepare_tokenizer(tokenizer: Any) -> None:
        add_tokens(tokenizer, token_strings(embedding.token_string, vectors))

    return DryRunPlan(method=method, title=title, layout=layout, trainable=trainable,
                      prepare_tokenizer=prepare_tokenizer)


def dry_run_plan(embedding: EmbeddingOptions, layout: OutputLayout) -> Any:
    """Textual Inversion's part of ``--dry_run`` (see :func:`embedding_dry_run_plan`)."""
    return embedding_dry_run_plan(embedding, layout, method="textual_inversion", title="Textual Inversion")
