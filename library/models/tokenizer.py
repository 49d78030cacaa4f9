"""Offline CLIP tokenizers for SD1 and SD2, built from the OpenAI BPE vocabulary shipped with the package.

The training scripts never read the tokenizer from the model: SD1 uses the tokenizer of
``openai/clip-vit-large-patch14`` and SD2 the one of ``stabilityai/stable-diffusion-2``. Both are the
same byte-level BPE (49408 entries, BOS ``<|startoftext|>`` = 49406, EOS ``<|endoftext|>`` = 49407,
77 positions); they differ only in the padding token: SD1 pads with EOS, SD2 with ``!`` (id 0). We
rebuild both from ``tokenizer/bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, MIT licence), so no network
access is ever needed.

``--tokenizer_cache_dir`` keeps the kohya layout: ``<dir>/openai_clip-vit-large-patch14`` (SD1) or
``<dir>/stabilityai_stable-diffusion-2`` (SD2), loaded when present and written (atomically) when absent.
Every tokenizer folder we write holds ``vocab.json`` and ``merges.txt`` (what transformers 4 and
diffusers users expect) next to whatever ``save_pretrained`` writes (transformers 5 writes only
``tokenizer.json`` and ``tokenizer_config.json``).
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from library.errors import UserError
from library.fileio import atomic_path

if TYPE_CHECKING:  # transformers costs about a second to import; load it only when a tokenizer is built
    from transformers import CLIPTokenizer

BPE_PATH = Path(__file__).parent / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SD1_PAD_TOKEN = EOS_TOKEN
SD2_PAD_TOKEN = "!"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
SD2_PAD_TOKEN_ID = 0
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
# The OpenAI vocabulary uses the first 49152 - 256 - 2 merges of the file (lines 1..48894 after the header).
N_MERGES = 49152 - 256 - 2

V1_CACHE_NAME = "openai_clip-vit-large-patch14"
V2_CACHE_NAME = "stabilityai_stable-diffusion-2"
MERGES_HEADER = "#version: 0.2"


def _byte_unicode_chars() -> list[str]:
    """The 256 printable stand-ins for the bytes 0..255, in the order CLIP numbers them.

    The printable Latin-1 bytes map to themselves and come first (``!`` is id 0); the remaining bytes
    (controls, space, ...) map to code points 256, 257, ... in byte order and follow.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    taken = set(printable)
    chars = [chr(b) for b in printable]
    extra = 0
    for byte in range(256):
        if byte not in taken:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@lru_cache(maxsize=1)
def _bpe_data() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Parse the bundled BPE file once: the 49408 vocabulary entries in id order and the merges.

    Memoized as immutable tuples; callers get fresh containers from :func:`bundled_vocab_and_merges`.
    """
    if not BPE_PATH.is_file():
        raise FileNotFoundError(f"the bundled CLIP vocabulary is missing: {BPE_PATH} (reinstall the package)")
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : N_MERGES + 1])
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{BPE_PATH} is not the OpenAI CLIP BPE file (expected {N_MERGES} merge lines)")
    chars = _byte_unicode_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise ValueError(f"{BPE_PATH} does not give {VOCAB_SIZE} distinct vocabulary entries")
    return tuple(tokens), merges  # type: ignore[return-value]


def bundled_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token → id, 49408 entries) and BPE merges (48894 pairs), freshly copied."""
    tokens, merges = _bpe_data()
    return {token: i for i, token in enumerate(tokens)}, list(merges)


def write_vocab_files(folder: str | os.PathLike, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write ``vocab.json`` and ``merges.txt`` in the Hugging Face layout into an existing ``folder``.

    ``merges.txt`` starts with the ``#version: 0.2`` header line, as transformers 4's CLIPTokenizer
    skips the first line of the file.
    """
    folder = Path(folder)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write(MERGES_HEADER + "\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)


def cache_folder_name(v2: bool) -> str:
    """The folder name under ``--tokenizer_cache_dir``: the kohya hub id with "/" replaced by "_"."""
    return V2_CACHE_NAME if v2 else V1_CACHE_NAME


def build_tokenizer(v2: bool) -> CLIPTokenizer:
    """Build a new SD1 (``v2=False``) or SD2 (``v2=True``) CLIP tokenizer from the bundled vocabulary.

    The parsed vocabulary is memoized; the tokenizer itself is a new object on every call because
    callers may change it (Textual Inversion adds tokens). Works with transformers 5 (``vocab``/``merges``
    given directly) and transformers 4 (files written to a temporary folder). ftfy is not needed.
    """
    from transformers import CLIPTokenizer

    vocab, merges = bundled_vocab_and_merges()
    kwargs: dict[str, Any] = {
        "unk_token": EOS_TOKEN,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": SD2_PAD_TOKEN if v2 else SD1_PAD_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
    }
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:
        return CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:  # transformers 4: needs file paths
        write_vocab_files(tmp, vocab, merges)
        return CLIPTokenizer(vocab_file=os.path.join(tmp, "vocab.json"),
                             merges_file=os.path.join(tmp, "merges.txt"), **kwargs)


def _ensure_vocab_files(tokenizer: Any, folder: Path) -> None:
    """Add ``vocab.json``/``merges.txt`` to a saved tokenizer folder when ``save_pretrained`` left them out.

    transformers 5 writes only ``tokenizer.json``; the BPE model of its backend writes the two files in
    the Hugging Face layout (base vocabulary without added tokens, like transformers 4's slow tokenizer).
    """
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend.model, "save"):
        backend.model.save(str(folder))
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise RuntimeError(f"could not write vocab.json and merges.txt for {type(tokenizer).__name__} in {folder}")


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike) -> None:
    """Save ``tokenizer`` to ``folder`` atomically (replacing it), with vocab.json and merges.txt present.

    Used for ``--tokenizer_cache_dir`` and for the ``tokenizer/`` subfolder of a diffusers model folder.
    """
    with atomic_path(folder, replace_kind="tokenizer") as tmp:
        tmp.mkdir()
        tokenizer.save_pretrained(str(tmp))
        _ensure_vocab_files(tokenizer, tmp)


def has_saved_tokenizer(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds a saved tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``)."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _load_saved(folder: Path) -> CLIPTokenizer:
    """Load a tokenizer saved in ``folder``; a broken folder is the user's to fix (UserError)."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # any failure to read the folder is reported in one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--tokenizer_cache_dir: cannot load the tokenizer saved in {folder} ({detail}); "
                        f"delete that folder to have it rebuilt") from exc


def load_tokenizer(v2: bool, cache_dir: str | os.PathLike | None = None) -> CLIPTokenizer:
    """The SD1 or SD2 CLIP tokenizer, optionally through the ``--tokenizer_cache_dir`` folder.

    Without ``cache_dir`` it is built from the bundled vocabulary. With one, the tokenizer is read from
    ``<cache_dir>/<cache_folder_name(v2)>`` when that folder holds a saved tokenizer; otherwise it is
    built and saved there (atomically) for next time. An existing non-empty folder that holds no
    tokenizer is left alone and reported as a UserError.
    """
    if cache_dir is None:
        return build_tokenizer(v2)
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"--tokenizer_cache_dir: {cache_dir} is a file; give a folder (it is created if missing)")
    folder = cache_dir / cache_folder_name(v2)
    if has_saved_tokenizer(folder):
        return _load_saved(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--tokenizer_cache_dir: {folder} exists but holds no saved tokenizer "
                        f"(tokenizer.json or vocab.json + merges.txt); remove it or choose another folder")
    tokenizer = build_tokenizer(v2)
    try:
        save_tokenizer(tokenizer, folder)
    except OSError as exc:
        if has_saved_tokenizer(folder):  # another process (multi-GPU launch) saved it at the same moment
            return tokenizer
        reason = exc.strerror or exc
        raise UserError(f"--tokenizer_cache_dir: cannot write the tokenizer to {folder} ({reason})") from exc
    return tokenizer
