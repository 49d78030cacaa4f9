"""The fine-tuning metadata json shared by the finetune/ scripts: reading, atomic writing, image keys.

Layout (file_formats.md §5): one JSON object ``{image_key: {field: value}}`` with the fields
``caption`` (str), ``tags`` (str) and ``train_resolution`` ([w, h]); other fields are kept as they are.
Files are written as the reference writes them: ``json.dumps(metadata, indent=2)`` (non-ASCII escaped),
UTF-8, no trailing newline, and atomically, so a failed run leaves the previous file untouched.

An image key is the image path as listed (the given ``train_data_dir`` joined with the file's relative
path, not made absolute) with ``--full_path``, else the file stem.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from library.data.images import list_images
from library.errors import UserError
from library.fileio import atomic_write_text

logger = logging.getLogger(__name__)

Metadata = dict[str, dict[str, Any]]


def read_metadata(path: str | os.PathLike) -> Metadata:
    """Read a metadata json; a missing, unreadable or malformed file is a UserError naming it.

    The file must hold a JSON object whose values are objects. A UTF-8 BOM is accepted.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"metadata file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"metadata file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read metadata file {path}: {exc.strerror or exc}") from None
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"metadata file {path} is not valid JSON ({exc.msg} at line {exc.lineno} "
                        f"column {exc.colno}); fix or delete it") from None
    if not isinstance(metadata, dict):
        raise UserError(f"metadata file {path} must hold a JSON object {{image key: {{caption, tags, ...}}}}, "
                        f"not a {type(metadata).__name__}")
    for key, entry in metadata.items():
        if not isinstance(entry, dict):
            raise UserError(f"metadata file {path}: entry '{key}' must be a JSON object, "
                            f"not {json.dumps(entry)[:60]}")
    return metadata


def metadata_text(metadata: Metadata) -> str:
    """The file content for ``metadata``: 2-space indentation, non-ASCII escaped, no trailing newline."""
    return json.dumps(metadata, indent=2)


def write_metadata(path: str | os.PathLike, metadata: Metadata) -> None:
    """Write ``metadata`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output metadata {path} is a folder; give a file name such as meta.json")
    try:
        atomic_write_text(path, metadata_text(metadata))
    except OSError as exc:
        raise UserError(f"cannot write metadata file {path}: {exc.strerror or exc}") from None
    logger.info("wrote %s (%d entries)", path, len(metadata))


def metadata_to_extend(in_json: str | None, out_json: str) -> Metadata:
    """The metadata a merge starts from: ``in_json`` when given (it must exist), else an existing
    ``out_json`` (read and then overwritten, as the reference does), else an empty object."""
    if in_json is not None:
        logger.info("reading metadata from %s", in_json)
        return read_metadata(in_json)
    if Path(out_json).exists():
        logger.info("reading existing metadata from %s; it will be updated", out_json)
        return read_metadata(out_json)
    logger.info("no existing metadata: starting a new file %s", out_json)
    return {}


def image_key(image_path: str | os.PathLike, full_path: bool) -> str:
    """The metadata key of an image: its path as listed with ``full_path``, else its file stem."""
    path = Path(image_path)
    return str(path) if full_path else path.stem


def list_dataset_images(train_data_dir: str | os.PathLike, recursive: bool) -> list[Path]:
    """The images of ``train_data_dir`` (sub-folders too when ``recursive``), sorted by path.

    Raises UserError when the folder does not exist; an empty folder only logs a warning.
    """
    folder = Path(train_data_dir)
    if not folder.is_dir():
        raise UserError(f"train_data_dir {folder}: no such folder")
    try:
        images = list_images(folder, recursive=recursive)
    except OSError as exc:
        raise UserError(f"train_data_dir {folder}: cannot list it ({exc.strerror or exc})") from None
    if images:
        logger.info("found %d image(s) in %s%s", len(images), folder, " and its sub-folders" if recursive else "")
    else:
        logger.warning("no images found in %s%s", folder, " or its sub-folders" if recursive else
                       " (use --recursive for sub-folders)")
    return images


def check_recursive_keys(recursive: bool, full_path: bool) -> None:
    """``--recursive`` needs ``--full_path``: file stems from different sub-folders would collide."""
    if recursive and not full_path:
        raise UserError("--recursive requires --full_path (image keys would be bare file names, which collide "
                        "across sub-folders)")


def summarize_paths(paths: list[Any], limit: int = 5) -> str:
    """``a, b, c (and N more)`` for a log line."""
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")
