"""Shared body of merge_captions_to_metadata.py and merge_dd_tags_to_metadata.py.

For every image of ``train_data_dir`` the text file ``<image path with its last suffix replaced by the
extension>`` is read (UTF-8, surrounding whitespace stripped) and stored under one field (``caption`` or
``tags``) of the image's metadata entry. Everything else in the metadata is kept. An image without a
text file is reported and its entry left as it was (the reference aborted the whole run there).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from finetune.metadata import (
    Metadata,
    check_recursive_keys,
    image_key,
    list_dataset_images,
    metadata_to_extend,
    summarize_paths,
    write_metadata,
)
from library.errors import UserError

logger = logging.getLogger(__name__)


def build_merge_parser(description: str, what: str, default_extension: str,
                       legacy_alias: bool) -> argparse.ArgumentParser:
    """The options of a merge script; ``what`` names the files ("caption" or "tag")."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("train_data_dir", help="folder of the training images (and their text files)")
    p.add_argument("out_json", help="metadata json to write (updated in place when it exists and no --in_json)")
    p.add_argument("--in_json", default=None,
                   help="metadata json to read and extend (default: out_json if it exists, else a new file)")
    p.add_argument("--full_path", action="store_true",
                   help="key images by their path (train_data_dir/name.png) instead of their file stem")
    p.add_argument("--caption_extension", default=default_extension,
                   help=f"extension of the {what} files (default {default_extension})")
    if legacy_alias:
        p.add_argument("--caption_extention", default=None,
                       help="misspelled legacy name of --caption_extension; overrides it when given")
    p.add_argument("--recursive", action="store_true", help="also read sub-folders (requires --full_path)")
    p.add_argument("--debug", action="store_true", help=f"print every image key and its {what}")
    return p


def text_extension(args: argparse.Namespace) -> str:
    """The extension to read: the legacy ``--caption_extention`` wins when given; it must start with '.'."""
    ext = getattr(args, "caption_extention", None) or args.caption_extension
    if not ext.startswith(".") or len(ext) < 2 or "/" in ext or "\\" in ext:
        raise UserError(f"--caption_extension must be a file extension starting with '.', such as .caption or "
                        f".txt; got '{ext}'")
    return ext


def read_text_file(path: Path) -> str:
    """The whole content of a caption/tag file, stripped; UTF-8 with an optional BOM."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None


def merge_text_files(metadata: Metadata, images: list[Path], field: str, extension: str, full_path: bool,
                     debug: bool = False) -> tuple[int, list[Path]]:
    """Set ``metadata[key][field]`` from each image's text file; returns ``(merged, images without file)``.

    New images get a new entry (appended in image order); existing entries keep their other fields and
    their position.
    """
    from tqdm import tqdm

    merged = 0
    missing: list[Path] = []
    for image in tqdm(images, desc=f"merging {field}", unit="img", disable=len(images) < 1000):
        text_path = image.with_suffix(extension)
        if not text_path.is_file():
            missing.append(image)
            continue
        text = read_text_file(text_path)
        key = image_key(image, full_path)
        metadata.setdefault(key, {})[field] = text
        merged += 1
        if debug:
            print(f"{key}: {text}")
    return merged, missing


def run_merge(args: argparse.Namespace, field: str, what: str) -> int:
    """Read the metadata, merge the text files of ``train_data_dir`` into ``field``, write ``out_json``."""
    check_recursive_keys(args.recursive, args.full_path)
    extension = text_extension(args)
    images = list_dataset_images(args.train_data_dir, args.recursive)
    metadata = metadata_to_extend(args.in_json, args.out_json)
    merged, missing = merge_text_files(metadata, images, field, extension, args.full_path, args.debug)
    if missing:
        logger.warning("%d image(s) have no %s file (<image name>%s) and were left as they were: %s",
                       len(missing), what, extension, summarize_paths(missing))
    logger.info("merged %d %s file(s) into '%s'", merged, what, field)
    write_metadata(args.out_json, metadata)
    return 0
