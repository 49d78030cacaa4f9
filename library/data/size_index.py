"""A persisted index of image sizes, so that a second start does not read image headers again.

One small JSON file per image folder lives in the user's cache folder (``$SDTRAIN_CACHE_DIR``, else
``$XDG_CACHE_HOME/sd-train``, else ``~/.cache/sd-train``), under ``image_sizes/<hash of the folder path>.json``.
An entry is trusted only while the file's modification time and byte size are unchanged; anything new
or changed is read from its header (in parallel) and the index is rewritten atomically. Nothing is
written into the user's image folders. Unreadable files are not cached: they are retried every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from library.data.images import read_image_sizes

logger = logging.getLogger(__name__)

Size = tuple[int, int]
INDEX_VERSION = 1


def cache_root() -> Path:
    """The toolkit's cache folder (see the module docstring)."""
    if os.environ.get("SDTRAIN_CACHE_DIR"):
        return Path(os.environ["SDTRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sd-train"


def index_path(folder: Path) -> Path:
    """Where the size index of ``folder`` is stored."""
    digest = hashlib.sha1(os.fsencode(os.path.abspath(folder))).hexdigest()[:20]
    return cache_root() / "image_sizes" / f"{digest}.json"


def _load_index(path: Path, folder: Path) -> dict[str, list[int]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION or data.get("folder") != str(folder):
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _save_index(path: Path, folder: Path, entries: dict[str, list[int]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "folder": str(folder), "entries": entries},
                                  separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache must not stop training
        logger.debug("could not write the image size index %s: %s", path, exc)


def cached_image_sizes(paths: Iterable[str | os.PathLike], *, use_index: bool = True,
                       workers: int | None = None) -> tuple[dict[str, Size], dict[str, str]]:
    """Sizes of ``paths`` like :func:`library.data.images.read_image_sizes`, reusing the persisted index.

    Returns ``(sizes, failures)`` keyed by the paths as strings; with ``use_index=False`` every header
    is read and nothing is stored.
    """
    paths = [os.fspath(p) for p in paths]
    if not use_index:
        sizes, failures = read_image_sizes(paths, workers=workers)
        return {os.fspath(p): s for p, s in sizes.items()}, {os.fspath(p): r for p, r in failures.items()}
    by_folder: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        by_folder[os.path.dirname(p)].append(p)
    sizes: dict[str, Size] = {}
    stamps: dict[str, list[int]] = {}
    to_read: list[str] = []
    indexes: dict[str, dict[str, list[int]]] = {}
    for folder, members in by_folder.items():
        index = _load_index(index_path(Path(folder)), Path(folder))
        indexes[folder] = index
        for p in members:
            try:
                st = os.stat(p)
            except OSError:
                to_read.append(p)  # read_image_sizes reports the reason
                continue
            stamp = [st.st_mtime_ns, st.st_size]
            stamps[p] = stamp
            hit = index.get(os.path.basename(p))
            if hit is not None and hit[:2] == stamp:
                sizes[p] = (hit[2], hit[3])
            else:
                to_read.append(p)
    failures: dict[str, str] = {}
    if to_read:
        fresh, failed = read_image_sizes(to_read, workers=workers)
        failures = {os.fspath(p): r for p, r in failed.items()}
        changed = set()
        for path, (w, h) in fresh.items():
            p = os.fspath(path)
            sizes[p] = (w, h)
            if p in stamps:
                folder = os.path.dirname(p)
                indexes[folder][os.path.basename(p)] = stamps[p] + [w, h]
                changed.add(folder)
        for folder in changed:
            _save_index(index_path(Path(folder)), Path(folder), indexes[folder])
    return {p: sizes[p] for p in paths if p in sizes}, failures
