"""Atomic writes: every file the toolkit writes goes to a temporary name and is renamed into place.

The temporary sits beside the target as ``.<target name>.sdtrain-<random>.tmp`` (a folder holding the
new item), so a killed run's leftovers are recognisable and removed at the next start
(:func:`remove_leftovers`). A folder is replaced by exchanging the two names in one ``renameat2``
call where Linux offers it, so the final name never points at nothing (a resumable state stays
resumable); elsewhere the old folder is moved aside just before the new one moves in.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Iterator

from library.errors import UserError

TEMP_TAG = ".sdtrain-"
_TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.sdtrain-[A-Za-z0-9_]+\.tmp$")
_PROBE_BYTES = 1 << 20


def temp_prefix(target_name: str) -> str:
    """The name prefix of the temporaries of ``target_name`` (see the module docstring)."""
    return f".{target_name}{TEMP_TAG}"


def leftover_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Our temporaries in ``folder`` (those of the targets ``names`` only, when given)."""
    folder = Path(folder)
    wanted = None if names is None else set(names)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _TEMP_PATTERN.match(entry.name)
        if match and (wanted is None or match.group("target") in wanted):
            found.append(Path(entry.path))
    return sorted(found)


def remove_leftovers(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporaries a killed run left in ``folder`` for ``names``; returns what was removed."""
    removed = leftover_temporaries(folder, names)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing names in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace_folder(new: Path, target: Path, scratch: Path) -> None:
    """Put folder ``new`` at ``target`` (an existing folder); the old one ends up inside ``scratch``."""
    if _exchange(new, target):
        return  # ``new`` now names the old folder, inside scratch, removed with it
    os.replace(target, scratch / "previous")
    os.replace(new, target)


def _probe_write(folder: Path) -> OSError | None:
    """Write and remove 1 MiB in ``folder``: the OSError a full or read-only disk gives, else None."""
    try:
        with tempfile.TemporaryFile(dir=folder) as handle:
            handle.write(b"\0" * _PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return exc
    return None


def describe_os_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the errno's meaning and name."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def _check_existing(target: Path, new_is_dir: bool, replace_kind: str | None) -> None:
    """Refuse to replace a folder with a file (or the reverse), or a folder that is not an empty one or
    a save of ``replace_kind``."""
    if not target.exists() and not target.is_symlink():
        return
    old_is_dir = target.is_dir() and not target.is_symlink()
    if old_is_dir != new_is_dir:
        what = "a folder" if old_is_dir else "a file"
        raise UserError(f"cannot write {target}: {what} of that name is in the way; it is left untouched — "
                        "move it away or choose another output name")
    if old_is_dir and any(target.iterdir()):
        from library.output_safety import KIND_WORDS, classify

        found = classify(target)
        if replace_kind is None or found != replace_kind:
            raise UserError(f"cannot write {target}: the folder there is {KIND_WORDS[found]}, which this toolkit "
                            "does not replace; it is left untouched — move it away or choose another output name")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, replace_kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    Works for files and folders. On an exception the temporary is removed and ``target`` is left
    exactly as it was. An existing file is replaced; an existing folder only when it is empty or a save of
    ``replace_kind`` (:func:`library.output_safety.classify`), never by a file or the reverse.
    A write that fails because the disk is full or read-only becomes one UserError naming ``target``.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise UserError(f"cannot write {target}: {describe_os_error(exc)}") from None
    tmp_item = tmp / target.name
    try:
        try:
            yield tmp_item
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - writers report a full disk in many ways
            cause = exc if isinstance(exc, OSError) and exc.errno else _probe_write(target.parent)
            if cause is None:
                raise
            raise UserError(f"cannot write {target}: {describe_os_error(cause)}; nothing was replaced") from None
        if not tmp_item.exists():
            raise FileNotFoundError(f"nothing was written to {tmp_item}")
        _apply_default_modes(tmp_item)
        _check_existing(target, tmp_item.is_dir(), replace_kind)
        try:
            if tmp_item.is_dir() and target.is_dir():
                _replace_folder(tmp_item, target, tmp)
            else:
                os.replace(tmp_item, target)
        except OSError as exc:
            raise UserError(f"cannot write {target}: {describe_os_error(exc)}; nothing was replaced") from None
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
