"""``cache_info``: image sizes and captions of a DreamBooth-style folder kept in ``<folder>/metadata_cache.json``.

The reference's file and format: a JSON object mapping each image path (the folder joined with the file
name) to ``{"caption": "...", "resolution": [width, height]}``, written with ``indent=2`` and non-ASCII
text kept. A start with ``cache_info`` on reads the captions and sizes from it instead of every caption
file and image header; without a usable file they are read as usual and the file is written (atomically,
``library.fileio``).

Differences from the reference (docs/datasets.md): entries are matched by file name, so a moved folder
keeps its cache; the file is used only while it lists exactly the images in the folder (an image added
or removed makes it stale: everything is read again and the file rewritten; the reference would skip new
images and fail on removed ones); a file of that name that is not such a cache is never used or
replaced. Like the reference, an image or caption edited in place is not noticed: delete the file then.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from library.data.size_index import cached_image_sizes
from library.errors import UserError
from library.fileio import atomic_write_text

logger = logging.getLogger(__name__)

INFO_CACHE_NAME = "metadata_cache.json"

Size = tuple[int, int]


@dataclass(frozen=True)
class CachedInfo:
    """One image's cached caption and ``(width, height)``."""

    caption: str
    size: Size


def _parse(data: Any) -> dict[str, CachedInfo] | None:
    """File name -> info of a document in the reference's format; None when it is not one."""
    if not isinstance(data, dict):
        return None
    out: dict[str, CachedInfo] = {}
    for key, meta in data.items():
        if not isinstance(meta, dict):
            return None
        caption, size = meta.get("caption", ""), meta.get("resolution")
        if caption is None:
            caption = ""
        if not isinstance(caption, str) or not isinstance(size, list) or len(size) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            return None
        name = os.path.basename(key)
        if name in out:
            return None
        out[name] = CachedInfo(caption, (size[0], size[1]))
    return out


def _read(path: str) -> tuple[str, dict[str, CachedInfo] | None]:
    """``("missing" | "foreign" | "cache", parsed)`` for the file at ``path``."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return "missing", None
    except (OSError, ValueError):
        return "foreign", None
    parsed = _parse(data)
    return ("cache", parsed) if parsed is not None else ("foreign", None)


def read_info_cache(folder: str, image_names: Sequence[str]) -> dict[str, CachedInfo] | None:
    """The cached caption and size of every image in ``image_names`` (the folder's images), or None when
    ``folder`` has no usable cache: none yet, not a cache, or one listing other images."""
    path = os.path.join(folder, INFO_CACHE_NAME)
    status, parsed = _read(path)
    if status == "missing":
        logger.info("%s: no image info cache yet; it is written after this scan", folder)
        return None
    if status == "foreign" or parsed is None:
        logger.warning("%s is not an image info cache (cache_info); it is neither used nor replaced", path)
        return None
    if set(parsed) != set(image_names):
        logger.info("%s lists other images than the folder holds; reading captions and sizes again", path)
        return None
    logger.info("using image sizes and captions from %s", path)
    return parsed


def write_info_cache(folder: str, entries: Sequence[Any]) -> None:
    """Read the sizes of ``entries`` (``ImageEntry`` of one folder; sizes are set on them) and write the
    folder's cache. Images whose size cannot be read stay out of it (and out of training, reported by
    the scan). An existing file of that name that is not a cache is left untouched."""
    path = os.path.join(folder, INFO_CACHE_NAME)
    if _read(path)[0] == "foreign":
        logger.warning("%s is not an image info cache (cache_info); it is neither used nor replaced", path)
        return
    sizes, _ = cached_image_sizes([e.path for e in entries])
    document = {}
    for entry in entries:
        size = sizes.get(entry.path)
        if size is not None:
            entry.size = size
            document[os.path.join(folder, os.path.basename(entry.path))] = {"caption": entry.caption,
                                                                            "resolution": list(size)}
    try:
        atomic_write_text(path, json.dumps(document, ensure_ascii=False, indent=2))
    except UserError as exc:  # a read-only dataset folder must not stop training
        logger.warning("could not write the image info cache: %s", exc)
        return
    logger.info("wrote image sizes and captions of %d image(s) to %s", len(document), path)
