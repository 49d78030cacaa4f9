"""Text-encoder output cache (docs/te_cache.md): encode every caption once before training.

Allowed only when the text encoder is frozen (LoRA with ``--network_train_unet_only``, fine_tune.py
without ``--train_text_encoder``, DreamBooth with ``--stop_text_encoder_training`` 0 or negative) and the
captions never change (no shuffle, caption / tag dropout or token warm-up; not Textual Inversion).
Then a caption's conditioning is a pure function of the caption, so it is computed once with the
method's own ``conditioning()`` (clip skip, token length, weighted captions included) and looked up by
caption text at every step. ``--cache_text_encoder_outputs_to_disk`` also writes one
``<image stem>_te_outputs.npz`` beside every image, keyed by a fingerprint of the text encoder (its
weights plus the states of a probe caption), the clip skip / token-length settings and the caption, so
files of another model or caption are recomputed instead of used.

Without either option, a run that meets the same conditions reuses outputs automatically: each distinct
caption is encoded the first time a batch needs it and looked up afterwards (no up-front pass, so start-up
is unchanged), up to :data:`AUTO_BUDGET_BYTES` of states. ``--no_cache_text_encoder_outputs`` turns it off.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from library.errors import UserError
from library.option_groups import DataOptions, DreamBoothOptions, TextEncoderCacheOptions

logger = logging.getLogger(__name__)

FILE_SUFFIX = "_te_outputs.npz"
FORMAT_VERSION = 1
PROBE_CAPTION = "a photo of sdtrain's text-encoder cache probe"
AUTO_BUDGET_BYTES = 1 << 30  # automatic reuse keeps at most this much (about 4,400 SD1 captions of 77 tokens)


def add_te_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--cache_text_encoder_outputs``, ``..._to_disk``, ``--text_encoder_batch_size`` and
    ``--no_cache_text_encoder_outputs``."""
    g = parser.add_argument_group("text-encoder output cache")
    a = g.add_argument
    a("--cache_text_encoder_outputs", action="store_true",
      help="encode every caption once before training (frozen text encoder and fixed captions only)")
    a("--cache_text_encoder_outputs_to_disk", action="store_true",
      help="also keep the outputs in <image stem>_te_outputs.npz beside each image and reuse them "
           "(implies --cache_text_encoder_outputs)")
    a("--text_encoder_batch_size", type=int, default=None,
      help="captions per text-encoder call while caching (default: --train_batch_size)")
    a("--no_cache_text_encoder_outputs", action="store_true",
      help="run the text encoder at every step even when it is frozen and the captions are fixed (by default "
           "each caption's output is then computed once, when first needed, and reused)")


@dataclass(frozen=True)
class TextEncoderUse:
    """What a method does with the text encoder, declared by its module from its own options before anything
    loads (:attr:`library.methods.base.MethodStart.text_encoder_use`)."""

    #: how long it trains: None for the whole run, 0 never (frozen), N for the first N optimizer steps
    steps: int | None
    #: why it trains and what would freeze it (the refusal of the cache names it), e.g. "LoRA trains
    #: text-encoder modules unless --network_train_unet_only is given"
    why: str

    @property
    def trains(self) -> bool:
        """Whether it trains at all in this run."""
        return self.steps != 0

    @property
    def stops_later(self) -> bool:
        """Whether it trains at first and is frozen from step :attr:`steps` on (DreamBooth's
        ``--stop_text_encoder_training N``, N > 0)."""
        return self.steps is not None and self.steps > 0



_CAPTION_OPTIONS = (("shuffle_caption", "shuffle_caption"), ("caption_dropout_rate", "caption_dropout_rate"),
                    ("caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs"),
                    ("caption_tag_dropout_rate", "caption_tag_dropout_rate"),
                    ("token_warmup_step", "token_warmup_step"),
                    ("enable_wildcard", "enable_wildcard"))


def caption_conflicts(group: Any, data: DataOptions, dreambooth: DreamBoothOptions) -> list[str]:
    """What makes captions change between steps (each named with where it is set): the caption options of
    every subset of ``group`` and its validation group, Textual Inversion's replacements, --weighted_captions
    with --max_token_length 150/225 and --no_token_padding (DreamBooth's; False in the other scripts)."""
    found = []
    groups = [group] + ([group.validation] if group.validation is not None else [])
    seen = set()
    for g in groups:
        for i, ds in enumerate(g.datasets):
            for j, subset in enumerate(ds.blueprint.subsets):
                for field, option in _CAPTION_OPTIONS:
                    if getattr(subset, field) and (field, id(subset)) not in seen:
                        seen.add((field, id(subset)))
                        found.append(f"{field} (--{option} or the dataset config; datasets[{i}].subsets[{j}])")
    if group.replacements:
        found.append("caption templates / token replacements (Textual Inversion)")
    if data.weighted_captions and data.max_token_length not in (None, 75):
        found.append("--weighted_captions with --max_token_length 150/225 (the chunk count depends on the batch)")
    if dreambooth.no_token_padding:
        found.append("--no_token_padding (the padding depends on the batch)")
    return found


def automatic_reuse(te_cache: TextEncoderCacheOptions, use: TextEncoderUse, conflicts: Sequence[str]) -> bool:
    """True when outputs are reused without being asked: neither cache option nor
    ``--no_cache_text_encoder_outputs`` given, fixed captions (no ``conflicts``, :func:`caption_conflicts`), and
    a text encoder that is frozen (or, :attr:`TextEncoderUse.stops_later`, frozen once it stops: reuse starts
    then)."""
    if te_cache.requested or te_cache.no_cache_text_encoder_outputs:
        return False
    frozen = not use.trains or use.stops_later
    return frozen and not conflicts


def check_text_encoder_cache(te_cache: TextEncoderCacheOptions, use: TextEncoderUse, conflicts: Sequence[str]) -> None:
    """Refuse ``--cache_text_encoder_outputs[_to_disk]`` where it would change training (one UserError): with
    ``--no_cache_text_encoder_outputs``, a text encoder that trains (``use``), captions that change
    (``conflicts``, :func:`caption_conflicts`) or a ``--text_encoder_batch_size`` below 1."""
    if not te_cache.requested:
        return
    if te_cache.no_cache_text_encoder_outputs:
        raise UserError("--no_cache_text_encoder_outputs cannot be combined with --cache_text_encoder_outputs"
                        "[_to_disk]; give one of them")
    problems = []
    if use.trains:
        problems.append(f"it needs a frozen text encoder, but {use.why}")
    if conflicts:
        problems.append(f"it needs fixed captions, but these change them: {', '.join(conflicts)}")
    size = te_cache.text_encoder_batch_size
    if size is not None and size < 1:
        problems.append(f"--text_encoder_batch_size must be at least 1, got {size}")
    if problems:
        raise UserError("--cache_text_encoder_outputs: " + "; ".join(problems))


def _method_trains_text_encoder(method: Any) -> bool:
    """The authoritative check on a built method (the argument check above runs before loading)."""
    return bool(method.text_encoder_in_optimizer)


def _text_encoder_trains_now(method: Any) -> bool:
    """Whether the text encoder trains at this step (DreamBooth's stops at ``--stop_text_encoder_training``)."""
    return bool(method.text_encoder_training)


def _fixed_caption(entry: Any, subset: Any, group: Any) -> str:
    """The caption an entry trains with (fixed options: no draw changes it)."""
    from library.data.captions import process_caption
    from library.data.dataset import caption_options

    return process_caption(entry.caption, caption_options(subset), random.Random(0), epoch=1, step=0,
                           replacements=group.replacements)


def _cache_file(image_path: str) -> Path:
    path = Path(image_path)
    return path.with_name(path.stem + FILE_SUFFIX)


class TextEncoderCache:
    """Conditioning per caption text, computed once; :meth:`conditioning` replaces the method's."""

    def __init__(self, method: Any, group: Any, batch_size: int, budget_bytes: int | None = None, *,
                 clip_skip: int | None = None):
        """Encode through ``method.conditioning`` with the tokenisation settings of ``group``. With
        ``budget_bytes`` (automatic reuse) captions are encoded as batches first need them, without a
        warning, and kept while the stored states stay within the budget."""
        self.method, self.group, self.batch_size = method, group, max(1, batch_size)
        self.clip_skip = clip_skip  # --clip_skip: part of the fingerprint
        self.budget_bytes = budget_bytes
        self.states: dict[str, Any] = {}
        self._late = 0
        self._stored_bytes = 0

    def _token_batch(self, captions: list[str]) -> dict[str, Any]:
        import torch

        from library.data.tokens import tokenize_caption, tokenize_weighted_captions

        g = self.group
        batch: dict[str, Any] = {"captions": list(captions)}
        if g.weighted_captions:
            batch["input_ids"], batch["token_weights"] = tokenize_weighted_captions(g.tokenizer, captions,
                                                                                    g.max_token_length)
        else:
            batch["input_ids"] = torch.stack([tokenize_caption(g.tokenizer, c, g.max_token_length) for c in captions])
        return batch

    def encode(self, captions: list[str], progress: bool = False) -> None:
        """Encode ``captions`` (in batches of ``batch_size``) into :attr:`states` (kept on the CPU)."""
        import torch
        from tqdm import tqdm

        bar = tqdm(total=len(captions), desc="caching text-encoder outputs", unit="caption", disable=not progress)
        for start in range(0, len(captions), self.batch_size):
            chunk = captions[start:start + self.batch_size]
            with torch.no_grad():
                hidden = self.method.conditioning(self._token_batch(chunk))
            for caption, row in zip(chunk, hidden.detach().cpu()):
                self.states[caption] = row.clone()
            bar.update(len(chunk))
        bar.close()

    def conditioning(self, batch: dict[str, Any], device: Any) -> Any:
        """The cached states of the batch's captions, stacked, on ``device`` (encodes unseen captions)."""
        import torch

        if self.budget_bytes is not None and _text_encoder_trains_now(self.method):
            return self.method.conditioning(batch)  # automatic reuse waits until the text encoder stops
        missing = [c for c in dict.fromkeys(batch["captions"]) if c not in self.states]
        if missing and self.budget_bytes is not None:
            return self._conditioning_within_budget(batch["captions"], missing, device)
        if missing:  # e.g. images added after start-up; correct, only slower
            if self._late == 0:
                logger.warning("text-encoder cache: encoding %d caption(s) not seen at start-up", len(missing))
            self._late += len(missing)
            self.encode(missing)
        return torch.stack([self.states[c] for c in batch["captions"]]).to(device)

    def _conditioning_within_budget(self, captions: list[str], missing: list[str], device: Any) -> Any:
        """Automatic reuse: encode the unseen captions in one call, keep them while the budget allows."""
        import torch

        with torch.no_grad():
            hidden = self.method.conditioning(self._token_batch(missing)).detach().cpu()
        fresh = dict(zip(missing, hidden))
        for caption, row in fresh.items():
            size = row.numel() * row.element_size()
            if self._stored_bytes + size > self.budget_bytes:
                if self._late == 0:
                    logger.info("text-encoder outputs: %d caption(s) kept (%.0f MiB); further ones are encoded "
                                "at every step", len(self.states), self._stored_bytes / 2**20)
                self._late += 1
                continue
            self.states[caption] = row.clone()
            self._stored_bytes += size
        return torch.stack([self.states.get(c, fresh.get(c)) for c in captions]).to(device)

    # ---- files ------------------------------------------------------------------------------------

    def fingerprint(self, model: Any) -> str:
        """What the states depend on besides the caption: the text encoder's weights, the settings, and
        the states of a probe caption (which also covers hooks such as frozen LoRA modules)."""
        import torch

        h = hashlib.sha256()
        g, m = self.group, self.method
        h.update(f"v{FORMAT_VERSION}|{type(m).__name__}|clip_skip={self.clip_skip}|"
                 f"max_token_length={g.max_token_length}|weighted={g.weighted_captions}".encode())
        for name, tensor in model.text_encoder.state_dict().items():
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        with torch.no_grad():
            probe = self.method.conditioning(self._token_batch([PROBE_CAPTION]))
        h.update(probe.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()

    @staticmethod
    def file_key(fingerprint: str, caption: str) -> str:
        """The key stored in (and required of) a cache file."""
        return hashlib.sha256(f"{fingerprint}\0{caption}".encode("utf-8")).hexdigest()

    def load_file(self, path: Path, key: str) -> Any | None:
        """The states stored in ``path`` when its key matches, else None (missing, stale or unreadable)."""
        import numpy as np
        import torch

        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                if str(data["cache_key"]) != key:
                    return None
                return torch.from_numpy(np.array(data["hidden_states"])).to(getattr(torch, str(data["dtype"])))
        except (OSError, ValueError, KeyError, AttributeError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning("text-encoder cache: recomputing %s (%s)", path, exc)
            return None

    @staticmethod
    def write_file(path: Path, key: str, caption: str, states: Any) -> None:
        """Write one cache file atomically (float32 states + their dtype, key and caption)."""
        import numpy as np

        from library.fileio import atomic_path

        try:
            with atomic_path(path) as tmp:
                np.savez(tmp, hidden_states=states.float().numpy(), dtype=np.array(str(states.dtype).split(".")[-1]),
                         cache_key=np.array(key), caption=np.array(caption))
        except OSError as exc:
            raise UserError(f"cannot write text-encoder cache {path}: {exc.strerror or exc}") from None


def _entries(group: Any) -> list[tuple[str, str | None]]:
    """(fixed caption, image path or None) of every image of the group and its validation group."""
    out = []
    groups = [group] + ([group.validation] if group.validation is not None else [])
    for g in groups:
        for ds in g.datasets:
            for entry in ds.entries:
                out.append((_fixed_caption(entry, ds.blueprint.subsets[entry.subset_index], g), entry.path))
    return out


def fill_cache(cache: TextEncoderCache, model: Any, *, to_disk: bool, write: bool) -> dict[str, int]:
    """Fill ``cache`` for every image: from matching files (``to_disk``), else by encoding; with ``write``
    also (re)write the missing or stale files. Returns counts for the log line."""
    items = _entries(cache.group)
    counts = {"captions": len(dict.fromkeys(c for c, _ in items)), "reused": 0, "written": 0, "encoded": 0}
    stale: list[tuple[str, Path, str]] = []
    fingerprint = cache.fingerprint(model) if to_disk else ""
    for caption, image_path in items:
        if not to_disk or image_path is None:
            continue
        path, key = _cache_file(image_path), cache.file_key(fingerprint, caption)
        states = cache.load_file(path, key)
        if states is None:
            stale.append((caption, path, key))
        else:
            counts["reused"] += 1
            cache.states.setdefault(caption, states)
    todo = [c for c in dict.fromkeys(c for c, _ in items) if c not in cache.states]
    cache.encode(todo, progress=True)
    counts["encoded"] = len(todo)
    if write:
        for caption, path, key in stale:
            cache.write_file(path, key, caption, cache.states[caption])
            counts["written"] += 1
    return counts


def build_text_encoder_cache(te_cache: TextEncoderCacheOptions, use: TextEncoderUse, conflicts: Sequence[str], *,
                             train_batch_size: int, accelerator: Any, model: Any, group: Any, method: Any,
                             keep_text_encoder: bool, clip_skip: int | None = None) -> TextEncoderCache | None:
    """The run's cache, filled before the first step with ``--cache_text_encoder_outputs``; the empty
    automatic one (:func:`automatic_reuse` of ``use`` and ``conflicts``), filled as batches need it; else None.
    Captions are encoded ``--text_encoder_batch_size`` (default ``train_batch_size``) at a time; ``clip_skip``
    (``--clip_skip``) is part of the states' fingerprint.

    On disk the main process writes the files first and the others then read them. Afterwards the text
    encoder moves to the CPU unless ``keep_text_encoder`` (sample images need it on the device).
    """
    batch_size = te_cache.text_encoder_batch_size or train_batch_size
    if automatic_reuse(te_cache, use, conflicts) and (use.stops_later or not _method_trains_text_encoder(method)):
        when = f" once the text encoder stops training (step {use.steps})" if use.stops_later else ""
        logger.info("text-encoder outputs are reused per caption%s (frozen text encoder, fixed captions); "
                    "--no_cache_text_encoder_outputs turns this off", when)
        return TextEncoderCache(method, group, batch_size, budget_bytes=AUTO_BUDGET_BYTES, clip_skip=clip_skip)
    if not te_cache.requested:
        return None
    if _method_trains_text_encoder(method):
        raise UserError(f"--cache_text_encoder_outputs: the {method.name} method trains the text encoder")
    to_disk = te_cache.cache_text_encoder_outputs_to_disk
    cache = TextEncoderCache(method, group, batch_size, clip_skip=clip_skip)
    if not to_disk or accelerator.is_main_process:
        counts = fill_cache(cache, model, to_disk=to_disk, write=to_disk)
        logger.info("text-encoder cache: %d distinct caption(s), %d encoded%s", counts["captions"], counts["encoded"],
                    f", {counts['reused']} file(s) reused, {counts['written']} written" if to_disk else "")
    accelerator.wait_for_everyone()
    if to_disk and not accelerator.is_main_process:
        fill_cache(cache, model, to_disk=True, write=False)
    if not keep_text_encoder and accelerator.device.type != "cpu":
        import torch

        model.text_encoder.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("text-encoder cache: the text encoder moved to the CPU (not needed on the device any more)")
    return cache
