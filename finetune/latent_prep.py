"""The work of prepare_buckets_latents.py: bucket every image as training does, encode it with the VAE
into ``.npz`` latents that fine_tune.py reads, and record ``train_resolution`` in the metadata.

* Buckets: :mod:`library.data.buckets` with the script's options (the same code training uses), so the
  bucket of an image here is the bucket training picks for it.
* Latents: :func:`library.data.latents.cache_latents` — images decoded, resized (OpenCV INTER_AREA) and
  centre-cropped in DataLoader worker processes while the VAE encodes; unreadable images are reported
  and skipped; files written atomically in the format of file_formats.md §6 (``arr_0``, float32,
  ``[4, h/8, w/8]``, unscaled posterior sample) plus our staleness record. The sampling noise is seeded
  per image file name, so a re-run writes identical files.
* File names: ``<image path without extension>.npz`` with full-path keys, ``<train_data_dir>/<stem>.npz``
  with stem keys — exactly where fine-tuning datasets look for them (``_flip.npz`` beside it).

Without ``--skip_existing`` every latent is re-encoded: new files are written under a hidden staging
name beside the final one and moved into place when encoding ends (also when it is interrupted, for the
files that were complete), so a failed run never leaves a latent paired with a stale flip twin.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from finetune.metadata import Metadata, image_key, summarize_paths
from library.data.buckets import (
    BucketAssignment,
    BucketManager,
    BucketSettings,
    assign_bucket,
    make_bucket_resolutions,
)
from library.data.images import read_image_sizes
from library.data.latents import CacheStats, LatentRequest, cache_latents, default_latent_workers, flip_npz_path
from library.errors import UserError
from library.output_safety import KIND_WORDS, classify

logger = logging.getLogger(__name__)

PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STAGING_SUFFIX = ".new.npz"
LATENT_SCALE = 8


@dataclass(frozen=True)
class PlannedImage:
    """One image to encode: its metadata key, its bucket assignment and its latent file."""

    image_path: Path
    key: str
    assignment: BucketAssignment
    npz_path: Path

    @property
    def train_resolution(self) -> list[int]:
        """The bucket as written to the metadata: ``[w, h]`` floored to multiples of 8."""
        w, h = self.assignment.bucket
        return [w - w % LATENT_SCALE, h - h % LATENT_SCALE]


@dataclass
class PrepareResult:
    """What one run did: the encoded images, those left out (path, reason) and the cache statistics."""

    done: list[PlannedImage] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    stats: CacheStats = field(default_factory=CacheStats)
    report: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# settings


def bucket_settings(max_resolution: tuple[int, int], min_bucket_reso: int, max_bucket_reso: int,
                    bucket_reso_steps: int, bucket_no_upscale: bool) -> BucketSettings:
    """Bucket settings from the options, checked so that every bucket is a multiple of 8 (latents are
    1/8 of the image size) and the bucket list is not empty."""
    if bucket_reso_steps <= 0 or bucket_reso_steps % LATENT_SCALE:
        raise UserError(f"--bucket_reso_steps must be a positive multiple of 8 (latents are 1/8 of the image "
                        f"size), got {bucket_reso_steps}")
    if not bucket_no_upscale:
        for option, value in (("--min_bucket_reso", min_bucket_reso), ("--max_bucket_reso", max_bucket_reso)):
            if value <= 0 or value % LATENT_SCALE:
                raise UserError(f"{option} must be a positive multiple of 8, got {value}")
    elif (min_bucket_reso, max_bucket_reso) != (256, 1024):
        logger.info("--bucket_no_upscale: --min_bucket_reso and --max_bucket_reso are ignored")
    settings = BucketSettings(resolution=max_resolution, enable_bucket=True, min_size=min_bucket_reso,
                              max_size=max_bucket_reso, reso_steps=bucket_reso_steps, no_upscale=bucket_no_upscale)
    try:
        if not bucket_no_upscale:
            make_bucket_resolutions(max_resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
        elif max_resolution[0] * max_resolution[1] < bucket_reso_steps ** 2:
            raise ValueError(f"--max_resolution {max_resolution} is smaller than one bucket step "
                             f"({bucket_reso_steps})")
    except ValueError as exc:
        raise UserError(f"bucket options: {exc}") from None
    return settings


def npz_path_for(image_path: Path, train_data_dir: str | os.PathLike, full_path: bool) -> Path:
    """Where the latent of an image goes: beside it (full-path keys) or ``train_data_dir/<stem>.npz``."""
    if full_path:
        return image_path.with_suffix(".npz")
    return Path(train_data_dir) / f"{image_path.stem}.npz"


# --------------------------------------------------------------------------------------------------
# planning


def plan_images(images: Sequence[Path], settings: BucketSettings, train_data_dir: str | os.PathLike,
                full_path: bool) -> tuple[list[PlannedImage], list[tuple[Path, str]]]:
    """Read every image's size from its header and assign its bucket; returns ``(planned, failed)``.

    Unreadable images and images too small for any bucket are returned in ``failed`` with the reason.
    Two images whose latents would share one file (``a.png`` and ``a.jpg``, or equal stems in
    sub-folders without ``--full_path``) are a UserError.
    """
    sizes, unreadable = read_image_sizes(images)
    failed = [(Path(p), why) for p, why in unreadable.items()]
    resos = settings.candidate_resos()
    planned: list[PlannedImage] = []
    owners: dict[Path, Path] = {}
    for image in images:
        size = sizes.get(image)
        if size is None:
            continue
        try:
            assignment = assign_bucket(size, settings, resos)
        except ValueError as exc:
            failed.append((image, str(exc)))
            continue
        npz = npz_path_for(image, train_data_dir, full_path)
        other = owners.setdefault(npz, image)
        if other != image:
            hint = "" if full_path else " (or use --full_path to keep latents beside their images)"
            raise UserError(f"{other} and {image} would both write the latent file {npz}: rename one{hint}")
        planned.append(PlannedImage(image, image_key(image, full_path), assignment, npz))
    return planned, failed


# --------------------------------------------------------------------------------------------------
# the VAE


def load_vae_for_latents(spec: str, dtype: torch.dtype) -> torch.nn.Module:
    """The VAE of ``model_name_or_path``: an ldm checkpoint (.ckpt/.safetensors), a VAE-only file, a
    diffusers model folder or VAE folder, or a Hub id (when online). Only the VAE weights are read."""
    from library.models.detect import detect_ldm_family, infer_configs_from_ldm
    from library.models.load import load_vae
    from library.models.presets import get_preset
    from library.models.statedict import open_state_dict

    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "vae" / "config.json").is_file()):
            raise UserError(f"model_name_or_path {spec}: folder has neither vae/config.json (diffusers model) "
                            "nor config.json (diffusers VAE)")
        return load_vae(str(path), get_preset("sd1"), dtype)  # a folder carries its own config
    if path.is_file():
        state = open_state_dict(path)
        shapes = state.shapes()
        family = detect_ldm_family(shapes)
        if family in ("sd1", "sd2", "vae_only"):
            configs = infer_configs_from_ldm(shapes)
        elif any(k.startswith("encoder.down_blocks.") for k in shapes):
            configs = get_preset("sd1")  # a diffusers-layout VAE state dict: the standard SD VAE
        else:
            what = {"lora": "a LoRA network file", "sdxl": "an SDXL checkpoint (only SD 1.x/2.x are supported)"}
            raise UserError(f"model_name_or_path {spec} is {what.get(family, 'not a Stable Diffusion model or VAE')}; "
                            "give the SD checkpoint or diffusers folder whose VAE should encode the images")
        return load_vae(str(path), configs, dtype)
    weight_suffixes = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
    if len(spec.split("/")) == 2 and not spec.startswith((".", "/", "~")) and path.suffix.lower() not in weight_suffixes:
        return load_vae(spec, get_preset("sd1"), dtype)  # Hub id: needs the network
    raise UserError(f"model_name_or_path {spec}: no such file or folder")


# --------------------------------------------------------------------------------------------------
# encoding


def _staging_path(npz_path: Path) -> Path:
    return npz_path.with_name(f".{npz_path.stem}{STAGING_SUFFIX}")


def _remove(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UserError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _promote(final: Path, flip_aug: bool) -> tuple[bool, bool]:
    """Move a finished staging latent (and its flip twin) onto ``final``; returns ``(moved, flip removed)``.

    Without ``flip_aug`` an old ``_flip.npz`` is removed. Incomplete pairs are discarded.
    """
    staging = _staging_path(final)
    staging_flip = flip_npz_path(staging)
    complete = staging.exists() and (not flip_aug or staging_flip.exists())
    if not complete:
        _remove(staging)
        _remove(staging_flip)
        return False, False
    os.replace(staging, final)
    if flip_aug:
        os.replace(staging_flip, flip_npz_path(final))
        return True, False
    old_flip = flip_npz_path(final)
    return True, classify(old_flip) == "latents" and _remove(old_flip)


def refuse_foreign_files(planned: Sequence[PlannedImage]) -> None:
    """UserError naming the first latent file name held by something that is no latent cache (fine_tune.py
    reads exactly ``<stem>.npz``, so no other name can be chosen; the user's file is never replaced)."""
    for item in planned:
        for path in (item.npz_path, flip_npz_path(item.npz_path)):
            found = classify(path)
            if found not in ("missing", "latents"):
                raise UserError(f"{path}: the latent file of {item.image_path} would replace {KIND_WORDS[found]} "
                                "that is no latent cache; it is left untouched — move it away first")


def encode_planned(planned: Sequence[PlannedImage], vae: torch.nn.Module, *, batch_size: int = 1,
                   workers: int | None = None, flip_aug: bool = False, skip_existing: bool = False,
                   seed: int = 0, progress: bool = True) -> CacheStats:
    """Encode the planned images into their ``.npz`` files (and ``_flip.npz`` with ``flip_aug``).

    ``skip_existing`` re-uses files that are valid for the image's bucket (shape, and our staleness
    record when present); otherwise every image is encoded again. Images that cannot be decoded are
    listed in ``stats.failed``; their old files are left alone.
    """
    refuse_foreign_files(planned)
    for item in planned:  # leftovers of an interrupted run
        _remove(_staging_path(item.npz_path))
        _remove(flip_npz_path(_staging_path(item.npz_path)))
    requests = [LatentRequest(image_path=item.image_path, bucket_reso=item.assignment.bucket,
                              resized_size=item.assignment.resized_size, flip=flip_aug,
                              npz_path=item.npz_path if skip_existing else _staging_path(item.npz_path))
                for item in planned]
    if workers is None:
        workers = default_latent_workers()
    if skip_existing:
        _, stats = cache_latents(requests, vae, batch_size=batch_size, workers=workers, seed=seed,
                                 progress=progress, return_latents=False, delete_unused_flip=True)
        return stats
    moved = removed_flips = 0
    try:
        _, stats = cache_latents(requests, vae, batch_size=batch_size, workers=workers, seed=seed,
                                 progress=progress, return_latents=False)
    finally:
        for item in planned:
            ok, flip_removed = _promote(item.npz_path, flip_aug)
            moved += ok
            removed_flips += flip_removed
    logger.debug("moved %d new latent file(s) into place", moved)
    if removed_flips:
        logger.info("removed %d old _flip.npz file(s) (no --flip_aug)", removed_flips)
    return stats


# --------------------------------------------------------------------------------------------------
# metadata and report


def update_metadata(metadata: Metadata, done: Sequence[PlannedImage]) -> None:
    """Set ``train_resolution`` of every encoded image (new images get a new entry; other fields stay)."""
    for item in done:
        metadata.setdefault(item.key, {})["train_resolution"] = item.train_resolution


def bucket_report(settings: BucketSettings, done: Sequence[PlannedImage]) -> list[str]:
    """``bucket i (w, h): count`` for every non-empty bucket in sorted order, then the mean aspect error."""
    manager: BucketManager[str] = BucketManager(settings)
    for item in done:
        manager.add_image(item.assignment, item.key)
    manager.sort()
    lines = [f"bucket {i} {tuple(reso)}: {len(items)}"
             for i, (reso, items) in enumerate(zip(manager.resos, manager.buckets)) if items]
    lines.append(f"mean ar error: {manager.mean_ar_error()}")
    return lines


def report_failures(failed: Sequence[tuple[Path, Any]]) -> None:
    """One warning listing the images that were left out, with their reasons."""
    if failed:
        logger.warning("left out %d image(s) that could not be read: %s", len(failed),
                       summarize_paths([f"{p} ({why})" for p, why in failed], limit=10))
