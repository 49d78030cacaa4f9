"""Open a weights file (safetensors or torch pickle) as a lazy, read-only state dict.

Tensors are not read until asked for: safetensors files are memory-mapped copy-on-write by the
``safetensors`` library and torch zip archives are loaded with ``mmap=True``, so converting a 4 GB checkpoint
into model modules never holds two copies of it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)


class LazyStateDict:
    """A mapping key → tensor whose tensors are read on access; also exposes shapes and metadata."""

    def __init__(self, path: Path, getter, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str],
                 dtypes: dict[str, torch.dtype], extra: dict | None = None):
        self.path = path
        self._get = getter
        self._shapes = shapes
        self._dtypes = dtypes
        self.metadata = metadata
        self.extra = extra or {}  # non-tensor top-level entries of a torch file (epoch, global_step, ...)

    def keys(self) -> list[str]:
        """All tensor keys in file order."""
        return list(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        return self._get(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key → shape, read from the header only."""
        return dict(self._shapes)

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of one tensor."""
        return self._dtypes[key]


def _check_safetensors_header(path: Path) -> None:
    """Fail with a clear message when a .safetensors file is empty, truncated or not safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: file is empty or truncated ({size} bytes); not a valid .safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 * 2**20):
            raise UserError(f"{path}: corrupt or truncated .safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path}: corrupt .safetensors file (header is not valid JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated .safetensors file: the header describes {8 + n + end} bytes "
                        f"but the file has {size}")


def _open_safetensors(path: Path) -> LazyStateDict:
    from safetensors import safe_open

    _check_safetensors_header(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError types
        raise UserError(f"{path}: cannot read as .safetensors: {exc}") from None
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for key in handle.keys():
        sl = handle.get_slice(key)
        shapes[key] = tuple(sl.get_shape())
        dtypes[key] = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
    return LazyStateDict(path, handle.get_tensor, shapes, handle.metadata() or {}, dtypes)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _torch_load(path: Path) -> object:
    errors = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, AttributeError,
              ModuleNotFoundError, ImportError, OSError)
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    mmap = zipfile.is_zipfile(path)  # the legacy (non-zip) form (library/pickle_files.py) cannot be mapped
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Weights only" not in str(exc):
            raise UserError(f"{path}: corrupt or truncated checkpoint ({_first_line(exc)})") from None
    except errors as exc:
        raise UserError(f"{path}: corrupt or truncated checkpoint ({_first_line(exc)})") from None
    # The file pickles more than tensors (e.g. training callbacks of old checkpoints).
    logger.warning("%s holds pickled Python objects besides weights; unpickling it fully. "
                   "Only load checkpoints you trust.", path)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
    except errors as exc:
        raise UserError(f"{path}: cannot read checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _open_torch(path: Path) -> LazyStateDict:
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a state dict (the file holds a {type(obj).__name__})")
    extra = {k: v for k, v in obj.items() if not isinstance(v, (dict, torch.Tensor))}
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return LazyStateDict(path, tensors.__getitem__, {k: tuple(v.shape) for k, v in tensors.items()}, {},
                         {k: v.dtype for k, v in tensors.items()}, extra)


def open_state_dict(path: str | os.PathLike) -> LazyStateDict:
    """Open a ``.safetensors`` or torch (``.ckpt``/``.pt``/``.bin``) weights file lazily.

    A torch file with a ``state_dict`` entry is unwrapped. Missing, empty, truncated or corrupt files
    raise :class:`UserError` naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a weights file")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _open_safetensors(path)
    if _looks_like_safetensors(path):
        return _open_safetensors(path)
    return _open_torch(path)


def _looks_like_safetensors(path: Path) -> bool:
    """True when a file with another extension is really safetensors (header length then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")
