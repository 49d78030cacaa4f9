"""Turn a dataset blueprint into image entries: which images, their captions, repeats and sizes.

DreamBooth-style subsets list the images of a folder (caption file, else the subset's class tokens);
fine-tuning subsets read a metadata JSON. Regularization images are balanced against the training
images as the reference documents. Image sizes come from file headers, read in parallel; unreadable
images are collected and reported once, then left out.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from library.config.blueprint import BlueprintDataset, BlueprintSubset
from library.data.captions import caption_file_name, metadata_caption, read_caption_file
from library.data.images import IMAGE_EXTENSIONS, is_image_file
from library.data.info_cache import read_info_cache, write_info_cache
from library.data.size_index import cached_image_sizes
from library.errors import UserError

logger = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass(slots=True)
class ImageEntry:
    """One image of a dataset as training sees it (repeats already balanced for reg images).

    Paths are kept as strings: a dataset holds tens of thousands of entries and ``pathlib`` objects
    cost measurable start-up time at that scale (bench/dataset_start.py).
    """

    key: str                      # printed/recorded name: the image path, or the metadata key
    path: str | None              # the image file (None: only pre-computed latents exist)
    caption: str                  # the source caption, before per-draw processing
    subset_index: int
    is_reg: bool = False
    num_repeats: int = 1
    size: Size | None = None      # (width, height) as displayed; None until scanned
    train_resolution: Size | None = None  # from fine-tuning metadata (prepare_buckets_latents)
    latents_npz: Path | None = None       # pre-computed latents (fine-tuning metadata datasets)


@dataclass
class ScanReport:
    """What was left out while listing images, for one summary at start-up."""

    unreadable: dict[Path, str] = field(default_factory=dict)
    empty_subsets: list[str] = field(default_factory=list)
    no_caption: int = 0

    def log(self) -> None:
        """Log one summary of problems (nothing when there were none)."""
        if self.unreadable:
            listing = "; ".join(f"{p}: {why}" for p, why in list(self.unreadable.items())[:20])
            more = f" (and {len(self.unreadable) - 20} more)" if len(self.unreadable) > 20 else ""
            logger.warning("left out %d unreadable image(s): %s%s", len(self.unreadable), listing, more)
        for where in self.empty_subsets:
            logger.warning("no images found in %s; subset skipped", where)
        if self.no_caption:
            logger.warning("%d image(s) have neither a caption file nor class tokens; they train with an empty "
                           "caption", self.no_caption)


def dreambooth_entries(subset: BlueprintSubset, subset_index: int, report: ScanReport) -> list[ImageEntry]:
    """Entries of a DreamBooth-style subset: every image of ``image_dir`` (sorted by name) with its caption.

    The folder is listed once; caption files are found by name in that listing rather than by asking
    the file system once per image.
    """
    folder = subset.image_dir or ""
    try:
        with os.scandir(folder) as it:
            names = {e.name for e in it if e.is_file()}
    except OSError as exc:
        raise UserError(f"{folder}: cannot list image folder ({exc.strerror})") from None
    images = sorted(n for n in names if is_image_file(n))
    if not images:
        report.empty_subsets.append(str(folder))
        return []
    entries = []
    cached = read_info_cache(folder, images) if subset.cache_info else None  # library/data/info_cache.py
    for name in images:
        caption_name = caption_file_name(name, subset.caption_extension, names)
        if cached is not None:
            caption = cached[name].caption
        elif caption_name is not None:
            caption = read_caption_file(os.path.join(folder, caption_name), subset.enable_wildcard)
        elif subset.class_tokens:
            caption = subset.class_tokens
        else:
            caption = ""
            report.no_caption += 1
        path = os.path.join(folder, name)
        entries.append(ImageEntry(key=path, path=path, caption=caption, subset_index=subset_index,
                                  is_reg=subset.is_reg, num_repeats=subset.num_repeats,
                                  size=None if cached is None else cached[name].size))
    if subset.cache_info and cached is None:
        write_info_cache(folder, entries)
    return entries


def _find_image(key: str, image_dir: Path | None) -> Path | None:
    as_path = Path(key)
    if as_path.is_file():
        return as_path
    if image_dir is not None:
        for ext in IMAGE_EXTENSIONS:
            for candidate in (image_dir / f"{key}{ext}", image_dir / f"{key}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _find_npz(key: str, image_dir: Path | None) -> Path | None:
    candidates = [Path(key).with_suffix(".npz")] if Path(key).suffix else []
    if image_dir is not None:
        candidates.append(image_dir / f"{key}.npz")
    return next((c for c in candidates if c.is_file()), None)


def finetuning_entries(subset: BlueprintSubset, subset_index: int, report: ScanReport) -> list[ImageEntry]:
    """Entries of a fine-tuning subset from its metadata JSON (keys: full paths or stems)."""
    meta_path = Path(subset.metadata_file or "")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise UserError(f"{meta_path}: cannot read metadata file ({exc.strerror})") from None
    if not isinstance(metadata, dict):
        raise UserError(f"{meta_path}: metadata must be a JSON object of image key -> {{caption, tags, ...}}")
    image_dir = Path(subset.image_dir) if subset.image_dir else None
    entries = []
    missing = []
    for key, info in metadata.items():
        info = info if isinstance(info, dict) else {}
        path = _find_image(key, image_dir)
        npz = _find_npz(key, image_dir)
        if path is None and npz is None:
            missing.append(key)
            continue
        reso = info.get("train_resolution")
        entries.append(ImageEntry(
            key=key, path=None if path is None else str(path), caption=metadata_caption(
                info.get("caption"), info.get("tags"), subset.caption_separator, subset.enable_wildcard),
            subset_index=subset_index, num_repeats=subset.num_repeats,
            train_resolution=(int(reso[0]), int(reso[1])) if isinstance(reso, (list, tuple)) and len(reso) == 2
            else None, latents_npz=npz))
    if missing:
        where = f" in {image_dir}" if image_dir else ""
        raise UserError(f"{meta_path}: no image or .npz found{where} for {len(missing)} key(s), e.g. "
                        f"'{missing[0]}' (set image_dir to the folder holding the images)")
    if not entries:
        report.empty_subsets.append(str(meta_path))
    return entries


def balance_reg_entries(train: list[ImageEntry], reg: list[ImageEntry]) -> list[ImageEntry]:
    """Give regularization images the repeats that make them as many samples as the training images.

    Reg images (in order) are taken with their own repeats until the count reaches the number of
    training samples (images × repeats); if all are taken and it is still short, further passes add one
    repeat to each in order until it is reached. Reg images never taken are dropped.
    """
    target = sum(e.num_repeats for e in train)
    if not reg or target == 0:
        return []
    repeats = [0] * len(reg)
    count = 0
    for i, entry in enumerate(reg):
        if count >= target:
            break
        repeats[i] = entry.num_repeats
        count += entry.num_repeats
    while count < target:
        for i in range(len(reg)):
            if count >= target:
                break
            repeats[i] += 1
            count += 1
    balanced = []
    for entry, count in zip(reg, repeats):
        if count > 0:
            entry.num_repeats = count
            balanced.append(entry)
    return balanced


def dataset_entries(dataset: BlueprintDataset, report: ScanReport) -> list[ImageEntry]:
    """All entries of one dataset (sizes not read yet), reg images balanced."""
    train: list[ImageEntry] = []
    reg: list[ImageEntry] = []
    for index, subset in enumerate(dataset.subsets):
        if subset.is_finetuning:
            train.extend(finetuning_entries(subset, index, report))
        else:
            (reg if subset.is_reg else train).extend(dreambooth_entries(subset, index, report))
    if reg and not train:
        logger.warning("dataset has regularization images but no training images; they are not used")
    return train + balance_reg_entries(train, reg)


def attach_sizes(per_dataset: list[list[ImageEntry]], report: ScanReport,
                 use_index: bool = True) -> list[list[ImageEntry]]:
    """Fill in every entry's size from its image header (read once per file, in parallel, through the
    persisted size index); entries whose image cannot be read are left out and recorded in ``report``."""
    paths = list(dict.fromkeys(e.path for entries in per_dataset for e in entries
                               if e.path is not None and e.size is None))  # sizes from cache_info are kept
    sizes, failures = cached_image_sizes(paths, use_index=use_index)
    report.unreadable.update({Path(p): why for p, why in failures.items()})
    out = []
    for entries in per_dataset:
        kept = []
        for entry in entries:
            if entry.path is None:
                entry.size = entry.train_resolution
                kept.append(entry)
            elif entry.size is not None and entry.path not in failures:
                kept.append(entry)
            else:
                size = sizes.get(entry.path)
                if size is not None:
                    entry.size = size
                    kept.append(entry)
        out.append(kept)
    return out
