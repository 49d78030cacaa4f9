"""Atomic writes: every file the toolkit writes goes to a temporary name and is renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    Works for files and folders. On an exception the temporary is removed and ``target`` is left
    exactly as it was. An existing folder at ``target`` is replaced only after the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp_item = tmp / target.name
    try:
        yield tmp_item
        if not tmp_item.exists():
            raise FileNotFoundError(f"nothing was written to {tmp_item}")
        _apply_default_modes(tmp_item)
        if tmp_item.is_dir() and target.is_dir():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp_item, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_modes() -> tuple[int, int]:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


def _apply_default_modes(item: Path) -> None:
    """Give written files the usual permissions (some writers create them 0600)."""
    file_mode, dir_mode = _default_modes()
    if item.is_dir():
        os.chmod(item, dir_mode)
        for root, dirs, files in os.walk(item):
            for name in dirs:
                os.chmod(os.path.join(root, name), dir_mode)
            for name in files:
                os.chmod(os.path.join(root, name), file_mode)
    else:
        os.chmod(item, file_mode)


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding=encoding)
