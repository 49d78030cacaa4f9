"""Caption tokenization and text encoding for training (training_behaviour.md §7 and §8).

Standard path (§7): a caption becomes ``n`` rows of 77 CLIP token ids (``n`` = 1, or 2/3 with
``--max_token_length`` 150/225); :func:`encode_tokens` runs the text encoder on every row, applies
``--clip_skip`` and glues the chunks back into one sequence of 77 or ``2 + 75n`` states.

Weighted path (§8, ``--weighted_captions``): A1111 attention syntax is parsed into (text, weight) runs
(:func:`parse_prompt_attention`), tokenized run by run (:func:`tokenize_weighted_caption`), every chunk's
77 states are kept (:func:`encode_weighted_tokens`) and the states are scaled by the token weights with
the mean preserved (:func:`apply_token_weights`).

SD1 and SD2 tokenizers are told apart only by ``pad_token_id == eos_token_id`` (SD1 pads with EOS).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

CHUNK_LENGTH = 77  # CLIP positions per encoder call: BOS + 75 tokens + EOS
CHUNK_TOKENS = CHUNK_LENGTH - 2
ALLOWED_MAX_TOKEN_LENGTHS = (75, 150, 225)
ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------

def check_max_token_length(max_token_length: int | None) -> int | None:
    """Validate ``--max_token_length``: None or 75 give None (one 77-token chunk); 150 and 225 are kept."""
    if max_token_length is None:
        return None
    if isinstance(max_token_length, bool) or max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise UserError(f"--max_token_length: {max_token_length!r} is not allowed; use 75 (the default), 150 or 225")
    return None if max_token_length == CHUNK_TOKENS else int(max_token_length)


def chunk_count(max_token_length: int | None) -> int:
    """How many 77-token chunks a caption uses: 1 (None/75), 2 (150) or 3 (225)."""
    length = check_max_token_length(max_token_length)
    return 1 if length is None else length // CHUNK_TOKENS


def _check_clip_skip(clip_skip: int | None) -> None:
    """``--clip_skip`` must be None or a positive integer."""
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1):
        raise UserError(f"--clip_skip: {clip_skip!r} is not allowed; use a whole number of 1 or more")


# --------------------------------------------------------------------------------------------------
# Standard tokenization (§7.2, §7.3, §7.6)
# --------------------------------------------------------------------------------------------------

def is_sd2_tokenizer(tokenizer: Any) -> bool:
    """True for the SD2 tokenizer, whose padding token is not EOS (the only test the scripts make)."""
    return tokenizer.pad_token_id != tokenizer.eos_token_id


def tokenize_caption(tokenizer: Any, caption: str, max_token_length: int | None) -> torch.Tensor:
    """Token ids of one caption as a LongTensor of shape (n, 77), n = 1, 2 or 3 (§7.2/§7.3).

    Without a long budget: ``[BOS, t1..tk, EOS, PAD...]`` (k ≤ 75, truncated with EOS kept). With
    ``max_token_length`` L = 150/225 the caption is tokenized to L + 2 ids and cut into L/75 chunks
    ``[first id] + 75 content ids + [last id]``. SD1 chunks therefore always end in EOS; SD2 chunks get
    two fix-ups: a chunk full of text ends in EOS, and an empty chunk starts ``BOS, EOS, PAD...``.
    """
    length = check_max_token_length(max_token_length)
    if length is None:
        ids = tokenizer(caption, padding="max_length", truncation=True, max_length=CHUNK_LENGTH).input_ids
        return torch.tensor([ids], dtype=torch.long)
    ids = tokenizer(caption, padding="max_length", truncation=True, max_length=length + 2).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sd2 = is_sd2_tokenizer(tokenizer)
    chunks = []
    for start in range(1, length + 1, CHUNK_TOKENS):
        chunk = [ids[0], *ids[start:start + CHUNK_TOKENS], ids[-1]]
        if sd2:
            if chunk[-2] not in (eos, pad):  # the chunk is full of text: close it with EOS
                chunk[-1] = eos
            if chunk[1] == pad:  # the chunk is empty: BOS, EOS, PAD...
                chunk[1] = eos
        chunks.append(chunk)
    return torch.tensor(chunks, dtype=torch.long)


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_token_length: int | None) -> torch.Tensor:
    """Token ids of a batch of captions, shape (B, n, 77): :func:`tokenize_caption` stacked."""
    return torch.stack([tokenize_caption(tokenizer, caption, max_token_length) for caption in captions])


def tokenize_captions_no_padding(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """``--no_token_padding`` (§7.6): the batch padded to its longest caption (at most 77), shape (B, L).

    No chunking; :func:`encode_tokens` hands any length other than 77 straight to the encoder.
    """
    ids = tokenizer(list(captions), padding=True, truncation=True, max_length=CHUNK_LENGTH).input_ids
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Encoding (§7.4)
# --------------------------------------------------------------------------------------------------

def _unwrap(model: Any) -> Any:
    """The model inside DistributedDataParallel (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module) or inner is model:
            return model
        model = inner


def final_layer_norm(text_encoder: Any) -> torch.nn.Module:
    """The CLIP text encoder's final layer norm, wherever this transformers version keeps it.

    transformers 4: ``text_encoder.text_model.final_layer_norm``; transformers 5:
    ``text_encoder.final_layer_norm``. Falls back to the first module named ``*final_layer_norm``.
    """
    model = _unwrap(text_encoder)
    for owner in (getattr(model, "text_model", None), model):
        norm = getattr(owner, "final_layer_norm", None) if owner is not None else None
        if isinstance(norm, torch.nn.Module):
            return norm
    for name, module in model.named_modules():
        if name.split(".")[-1] == "final_layer_norm":
            return module
    raise TypeError(f"{type(model).__name__} has no final_layer_norm; is it a CLIP text encoder?")


def _model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def run_text_encoder(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """Hidden states (N, 77, D) for ids (N, 77): the final output, or with ``clip_skip`` = k the
    ``hidden_states[-k]`` output passed through the final layer norm (k = 1 equals None)."""
    _check_clip_skip(clip_skip)
    input_ids = input_ids.to(_model_device(text_encoder))
    if clip_skip is None:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states
    if clip_skip > len(hidden):
        raise UserError(f"--clip_skip: {clip_skip} is too large; this text encoder has {len(hidden) - 1} layers "
                        f"(use 1 to {len(hidden)})")
    return final_layer_norm(text_encoder)(hidden[-clip_skip])


def encode_tokens(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int | None, max_token_length: int | None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Encoder hidden states for token ids of shape (B, n, 77) (or (B, 77)), as ``get_hidden_states`` (§7.4).

    All chunks are encoded at once (see :func:`run_text_encoder` for ``clip_skip``), reshaped to
    (B, n·77, D) and, with a long budget, collapsed to (B, 2 + 75n, D): the BOS state of chunk 0, the 75
    content states of every chunk, and the very last state. Cast to ``dtype`` when given.

    ``--no_token_padding`` ids whose last dimension is not 77 are encoded as they are and returned at
    once, without clip_skip, chunk handling or dtype cast (the baseline behaviour, §7.6).
    The SD2 branch of the baseline re-assembly holds a never-true condition (BUG, no-op), so SD1 and SD2
    are re-assembled the same way here.
    """
    if input_ids.shape[-1] != CHUNK_LENGTH:
        flat = input_ids.reshape(input_ids.shape[0], input_ids.shape[-1])
        return text_encoder(flat.to(_model_device(text_encoder)))[0]
    n = chunk_count(max_token_length)
    batch = input_ids.shape[0]
    chunks_in = input_ids.numel() // (batch * CHUNK_LENGTH) if batch else n
    if chunks_in != n:
        raise ValueError(f"input_ids hold {chunks_in} chunks of 77 per caption but max_token_length "
                         f"{max_token_length} needs {n}")
    states = run_text_encoder(text_encoder, input_ids.reshape(-1, CHUNK_LENGTH), clip_skip)
    states = states.reshape(batch, -1, states.shape[-1])
    if n > 1:
        parts = [states[:, :1]]
        parts += [states[:, j * CHUNK_LENGTH + 1: j * CHUNK_LENGTH + 1 + CHUNK_TOKENS] for j in range(n)]
        parts.append(states[:, -1:])
        states = torch.cat(parts, dim=1)
    if dtype is not None:
        states = states.to(dtype)
    return states


# --------------------------------------------------------------------------------------------------
# Weighted captions (§8)
# --------------------------------------------------------------------------------------------------

# One lexical item of the A1111 attention syntax, tried in this order: an escaped bracket or backslash,
# a lone backslash, "(", "[", ":<number>)" (group 1 = the number), ")", "]", plain text, a lone ":".
_ATTENTION_ITEM = re.compile(
    r"\\[()\[\]\\]|\\|\(|\[|:([+-]?(?:\d+\.?\d*|\.\d+))\)|\)|\]|[^\\()\[\]:]+|:")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a caption into (text, weight) runs following the A1111 attention syntax (§8.1).

    ``(x)`` multiplies the weight of its contents by 1.1, ``[x]`` divides it by 1.1, ``(x:w)`` multiplies
    it by the signed decimal ``w``; nesting multiplies (in closing order, so the floats match A1111's).
    ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters. Unclosed openers are closed at the
    end of the text; an unmatched ``)`` or ``]``, and a ``:`` not followed by a number and ``)``, are
    literal. Adjacent runs with equal weights are merged; empty input gives ``[("", 1.0)]``.

    Where the spec is silent this follows A1111: a lone backslash is dropped, ``BREAK`` is plain text
    (the baseline has no BREAK), and ``(x:w)`` outside any round bracket is literal text. A number
    that is not a valid decimal (``(x:1.2.3)``) is literal text here, where A1111 would fail.
    """
    runs: list[list[Any]] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_ITEM.finditer(text):
        item, number = match.group(0), match.group(1)
        if item.startswith("\\"):
            runs.append([item[1:], 1.0])
        elif item == "(":
            round_open.append(len(runs))
        elif item == "[":
            square_open.append(len(runs))
        elif number is not None and round_open:
            scale_from(round_open.pop(), float(number))
        elif item == ")" and round_open:
            scale_from(round_open.pop(), ROUND_BRACKET_FACTOR)
        elif item == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_BRACKET_FACTOR)
        else:
            runs.append([item, 1.0])
    for start in round_open:
        scale_from(start, ROUND_BRACKET_FACTOR)
    for start in square_open:
        scale_from(start, SQUARE_BRACKET_FACTOR)

    merged: list[tuple[str, float]] = []
    for run_text, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + run_text, weight)
        else:
            merged.append((run_text, weight))
    return merged or [("", 1.0)]


def weighted_tokens(tokenizer: Any, caption: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """Content token ids (no BOS/EOS) and their weights for a caption, truncated to ``max_tokens`` (§8.2).

    Each run from :func:`parse_prompt_attention` is tokenized on its own and every token inherits the
    run's weight. A truncation is logged.
    """
    runs = parse_prompt_attention(caption)
    encoded = tokenizer([run for run, _ in runs], add_special_tokens=False, verbose=False).input_ids
    ids: list[int] = []
    weights: list[float] = []
    for run_ids, (_, weight) in zip(encoded, runs):
        ids += run_ids
        weights += [weight] * len(run_ids)
    if len(ids) > max_tokens:
        logger.warning("weighted caption truncated to %d tokens (it has %d); shorten it or raise "
                       "--max_token_length: %.60s", max_tokens, len(ids), caption)
        ids, weights = ids[:max_tokens], weights[:max_tokens]
    return ids, weights


def _weighted_rows(tokenizer: Any, ids: list[int], weights: list[float],
                   n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Lay content ids/weights into ``n`` chunks ``[BOS, ≤75 tokens, EOS...]`` padded with EOS (§8.4)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    id_rows, weight_rows = [], []
    for j in range(n):
        chunk_ids = ids[j * CHUNK_TOKENS:(j + 1) * CHUNK_TOKENS]
        chunk_weights = weights[j * CHUNK_TOKENS:(j + 1) * CHUNK_TOKENS]
        pad = CHUNK_LENGTH - 1 - len(chunk_ids)
        id_rows.append([bos, *chunk_ids, *([eos] * pad)])
        weight_rows.append([1.0, *chunk_weights, *([1.0] * pad)])
    return id_rows, weight_rows


def _chunks_needed(token_count: int, max_chunks: int) -> int:
    """``max(1, min(m, ceil(tokens / 75)))``, written as the baseline does: ``(tokens - 1) // 75 + 1``."""
    return max(1, min(max_chunks, (token_count - 1) // CHUNK_TOKENS + 1))


def tokenize_weighted_caption(tokenizer: Any, caption: str,
                              max_token_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and weights, both of shape (n, 77), for one weighted caption (§8.2–8.4).

    n is the number of chunks this caption needs (at most ``max_token_length // 75``). Row j is
    ``[BOS, tokens 75j.., EOS...]``, padded with EOS for SD1 and SD2 alike; its weights are 1.0 at BOS,
    EOS and padding and the run weights on the tokens. Use :func:`tokenize_weighted_captions` for a
    batch, whose chunk count is that of its longest caption.
    """
    max_chunks = chunk_count(max_token_length)
    ids, weights = weighted_tokens(tokenizer, caption, CHUNK_TOKENS * max_chunks)
    id_rows, weight_rows = _weighted_rows(tokenizer, ids, weights, _chunks_needed(len(ids), max_chunks))
    return torch.tensor(id_rows, dtype=torch.long), torch.tensor(weight_rows, dtype=torch.float32)


def tokenize_weighted_captions(tokenizer: Any, captions: Sequence[str],
                               max_token_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and weights of shape (B, m', 77) for a batch: m' chunks as the longest caption needs (§8.3).

    Shorter captions get extra chunks ``BOS, EOS × 76`` with weight 1.0, which is what the baseline's
    single EOS-padded row yields for them.
    """
    max_chunks = chunk_count(max_token_length)
    tokenized = [weighted_tokens(tokenizer, caption, CHUNK_TOKENS * max_chunks) for caption in captions]
    n = max((_chunks_needed(len(ids), max_chunks) for ids, _ in tokenized), default=1)
    id_batch, weight_batch = [], []
    for ids, weights in tokenized:
        id_rows, weight_rows = _weighted_rows(tokenizer, ids, weights, n)
        id_batch.append(id_rows)
        weight_batch.append(weight_rows)
    return torch.tensor(id_batch, dtype=torch.long), torch.tensor(weight_batch, dtype=torch.float32)


def encode_weighted_tokens(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """Hidden states (B, 77·m', D) for weighted-caption ids (B, m', 77): every chunk keeps all 77 states (§8.5).

    At the baseline ``--clip_skip`` has no effect on this path (BUG, fixed upstream later): pass
    ``clip_skip=None`` to reproduce it, or the option's value for the upstream fix. No dtype cast.
    """
    batch = input_ids.shape[0]
    states = run_text_encoder(text_encoder, input_ids.reshape(-1, CHUNK_LENGTH), clip_skip)
    return states.reshape(batch, -1, states.shape[-1])


def apply_token_weights(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale states (B, L, D) by per-token weights (B, L) or (B, n, 77), keeping each sample's mean (§8.6).

    ``μ0 = mean(E)`` over tokens and channels; ``E ← E·w``; ``μ1 = mean(E)``; ``E ← E·μ0/μ1``. The means
    are taken in float32 and cast back to the states' dtype, as the baseline does. A sample whose mean
    after weighting is zero (possible with untrained encoders, never with real CLIP weights) is left
    weighted but not rescaled, instead of turning into inf/NaN.
    """
    batch = hidden_states.shape[0]
    weights = weights.reshape(batch, -1).to(device=hidden_states.device, dtype=hidden_states.dtype)
    if weights.shape[1] != hidden_states.shape[1]:
        raise ValueError(f"{weights.shape[1]} token weights per sample for {hidden_states.shape[1]} hidden states")
    before = hidden_states.float().mean(dim=(-2, -1)).to(hidden_states.dtype)
    weighted = hidden_states * weights.unsqueeze(-1)
    after = weighted.float().mean(dim=(-2, -1)).to(hidden_states.dtype)
    safe = after != 0
    ratio = torch.where(safe, before / torch.where(safe, after, torch.ones_like(after)), torch.ones_like(after))
    return weighted * ratio[:, None, None]


def encode_weighted_captions(tokenizer: Any, text_encoder: Any, captions: Sequence[str],
                             max_token_length: int | None, clip_skip: int | None = None) -> torch.Tensor:
    """The whole ``--weighted_captions`` conditioning for a batch of captions: (B, 77·m', D) (§8)."""
    input_ids, weights = tokenize_weighted_captions(tokenizer, captions, max_token_length)
    states = encode_weighted_tokens(text_encoder, input_ids, clip_skip)
    return apply_token_weights(states, weights)
