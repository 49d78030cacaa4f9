"""Bucketed training datasets whose batch order is a pure function of (seed, epoch).

A :class:`DatasetGroup` holds every dataset of a run. ``epoch_batches(epoch)`` lists the batches of an
epoch (items shuffled inside their bucket, batches shuffled across buckets and datasets) from a
generator seeded with ``(seed, epoch)`` only, and ``load_batch`` builds every sample of a batch with a
generator of its own, seeded with the sample's identity in the epoch (:func:`sample_key`: seed, epoch,
dataset, bucket, place in the bucket's shuffled order). So the same seed gives the same batches whatever
the number of DataLoader workers, a run resumed in the middle of an epoch continues with exactly the
batches it would have seen, and a sample's augmentations (and its training noise, seeded from the same
key) do not depend on the batch size or the number of processes.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from library.config.blueprint import BlueprintDataset, BlueprintSubset, DatasetBlueprint
from library.data.buckets import BucketAssignment, BucketSettings, assign_bucket
from library.data.captions import CaptionOptions, process_caption
from library.data.entries import ImageEntry, ScanReport, attach_sizes, dataset_entries
from library.distributed import main_computes
from library.data.images import (ImageLoadError, color_aug, cover_size, face_crop_aug_range, flip, load_image_rgb,
                                 parse_face_info, resize_and_crop)
from library.data.tokens import tokenize_caption, tokenize_weighted_captions
from library.errors import UserError

logger = logging.getLogger(__name__)

Size = tuple[int, int]
SMALL_IMAGE_FACTOR = 0.25  # warn when an image has under a quarter of its bucket's pixels


@dataclass(frozen=True)
class BatchSpec:
    """One batch of an epoch: a dataset, its bucket, and entry indices (repeats expanded)."""

    dataset: int
    bucket: Size
    items: tuple[int, ...]
    first: int = 0  # place of items[0] in its bucket's shuffled order of the epoch (the samples' identity)


def sample_key(seed: int, epoch: int, spec: BatchSpec, index: int) -> str:
    """The identity of the ``index``-th sample of ``spec`` in ``epoch``: the same whatever the batch size and
    the number of processes (the place in the bucket's shuffled order does not depend on either)."""
    return f"{seed}:{epoch}:{spec.dataset}:{spec.bucket[0]}x{spec.bucket[1]}:{spec.first + index}"


def noise_seed(key: str) -> int:
    """A 63-bit seed for the training noise of the sample ``key`` (:func:`sample_key`)."""
    digest = hashlib.sha256(f"sdtrain-noise:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def caption_options(subset: BlueprintSubset) -> CaptionOptions:
    """The caption settings of a subset."""
    return CaptionOptions(shuffle_caption=subset.shuffle_caption, keep_tokens=subset.keep_tokens,
                          caption_dropout_rate=subset.caption_dropout_rate,
                          caption_dropout_every_n_epochs=subset.caption_dropout_every_n_epochs,
                          caption_tag_dropout_rate=subset.caption_tag_dropout_rate,
                          token_warmup_min=subset.token_warmup_min, token_warmup_step=subset.token_warmup_step,
                          caption_prefix=subset.caption_prefix, caption_suffix=subset.caption_suffix,
                          caption_separator=subset.caption_separator,
                          keep_tokens_separator=subset.keep_tokens_separator,
                          secondary_separator=subset.secondary_separator, enable_wildcard=subset.enable_wildcard)


def bucket_settings(blueprint: BlueprintDataset, entries: Sequence[ImageEntry]) -> BucketSettings:
    """Bucket settings of a dataset; fine-tuning metadata with ``train_resolution`` everywhere fixes the
    buckets to those resolutions (bucketing forced on), as the reference does."""
    resolutions = [e.train_resolution for e in entries]
    if entries and all(r is not None for r in resolutions):
        predefined = tuple(sorted(set(resolutions)))  # type: ignore[arg-type]
        reso = blueprint.resolution or max(predefined, key=lambda r: r[0] * r[1])
        return BucketSettings(resolution=reso, enable_bucket=True, predefined=predefined)
    if blueprint.resolution is None:
        raise UserError("a fine-tuning dataset without train_resolution in its metadata needs a resolution "
                        "(--resolution or 'resolution' in the dataset config)")
    return BucketSettings(resolution=blueprint.resolution, enable_bucket=blueprint.enable_bucket,
                          min_size=blueprint.min_bucket_reso, max_size=blueprint.max_bucket_reso,
                          reso_steps=blueprint.bucket_reso_steps, no_upscale=blueprint.bucket_no_upscale)


def own_bucket(entry: ImageEntry) -> BucketAssignment | None:
    """A fine-tuning entry's own ``train_resolution`` bucket (from prepare_buckets_latents.py), as the
    reference uses it; the nearest aspect ratio could pick another bucket (e.g. after --bucket_no_upscale)."""
    if entry.train_resolution is None or entry.size is None:
        return None
    bucket = tuple(entry.train_resolution)
    return BucketAssignment(bucket, cover_size(entry.size, bucket),
                            bucket[0] / bucket[1] - entry.size[0] / entry.size[1])


class BucketedDataset:
    """One dataset of the blueprint: entries with their bucket assignments."""

    def __init__(self, blueprint: BlueprintDataset, entries: list[ImageEntry]):
        """Assign every entry (sizes already read) to a bucket."""
        self.blueprint = blueprint
        self.settings = bucket_settings(blueprint, entries)
        resos = self.settings.candidate_resos()
        self.entries: list[ImageEntry] = []
        self.assignments: list[BucketAssignment] = []
        small, unusable = [], []
        for entry in entries:
            assert entry.size is not None
            try:
                assignment = own_bucket(entry) if self.settings.predefined is not None else None
                assignment = assignment or assign_bucket(entry.size, self.settings, resos)
            except ValueError as exc:  # e.g. narrower than one bucket step with bucket_no_upscale
                unusable.append(f"{entry.key} ({exc})")
                continue
            self.entries.append(entry)
            self.assignments.append(assignment)
            bw, bh = assignment.bucket
            if entry.size[0] * entry.size[1] < SMALL_IMAGE_FACTOR * bw * bh:
                small.append(f"{entry.key} ({entry.size[0]}x{entry.size[1]} for bucket {bw}x{bh})")
        if unusable:
            logger.warning("left out %d image(s) that fit no bucket: %s%s", len(unusable), "; ".join(unusable[:5]),
                           " ..." if len(unusable) > 5 else "")
        if small:
            logger.warning("%d image(s) have under a quarter of their bucket's pixels and will be enlarged a lot: "
                           "%s%s", len(small), "; ".join(small[:5]), " ..." if len(small) > 5 else "")
        self.buckets: dict[Size, list[int]] = {}
        for index, (entry, assignment) in enumerate(zip(self.entries, self.assignments)):
            self.buckets.setdefault(assignment.bucket, []).extend([index] * entry.num_repeats)
        self.buckets = dict(sorted(self.buckets.items()))

    @property
    def num_samples(self) -> int:
        """Samples per epoch (repeats included)."""
        return sum(len(v) for v in self.buckets.values())

    def batch_count(self) -> int:
        """Batches per epoch: ceil(bucket size / batch size) summed over buckets."""
        b = self.blueprint.batch_size
        return sum(-(-len(items) // b) for items in self.buckets.values())

    def epoch_batches(self, dataset_index: int, rng: random.Random) -> list[BatchSpec]:
        """This dataset's batches for one epoch: each bucket shuffled, then cut into batches."""
        out = []
        b = self.blueprint.batch_size
        for reso, items in self.buckets.items():
            order = list(items)
            rng.shuffle(order)
            out.extend(BatchSpec(dataset_index, reso, tuple(order[i:i + b]), i) for i in range(0, len(order), b))
        return out

    def summary_lines(self, index: int) -> list[str]:
        """The start-up report: images, repeats, reg images, and one line per bucket."""
        n_reg = sum(1 for e in self.entries if e.is_reg)
        lines = [f"[dataset {index}] {len(self.entries) - n_reg} train image(s), {n_reg} regularization image(s), "
                 f"{self.num_samples} sample(s) per epoch, batch size {self.blueprint.batch_size}, "
                 f"{self.batch_count()} batch(es) per epoch"]
        for i, (reso, items) in enumerate(self.buckets.items()):
            lines.append(f"  bucket {i}: resolution {reso}, count: {len(items)}")
        errors = [a.ar_error for a in self.assignments]
        if errors:
            lines.append(f"  mean ar error (without repeats): {sum(abs(e) for e in errors) / len(errors):.4f}")
        return lines


class DatasetGroup:
    """All datasets of a run, producing deterministic batches."""

    def __init__(self, datasets: list[BucketedDataset], *, seed: int, tokenizer: Any = None,
                 max_token_length: int | None = None, weighted_captions: bool = False,
                 max_train_steps: int = 0):
        """Wrap the datasets; ``tokenizer`` may be None when batches need no input ids (e.g. previews)."""
        self.datasets = datasets
        self.seed = seed
        self.tokenizer = tokenizer
        self.max_token_length = max_token_length
        self.weighted_captions = weighted_captions
        # caption replacements applied after processing (Textual Inversion: templates / token expansion)
        self.replacements: dict[str, str | list[str]] | None = None
        # (dataset, entry) -> (latent, flipped latent or None), filled by the latent cache
        self.latents: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
        self._failed: set[str] = set()  # images that failed to decode: reported once, then skipped
        self.set_max_train_steps(max_train_steps)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """Resolve fractional token warm-up lengths once the run's step count is known."""
        self._caption_options = [[caption_options(s).resolved(max_train_steps) if s.token_warmup_step < 1
                                  else caption_options(s) for s in ds.blueprint.subsets] for ds in self.datasets]

    def __len__(self) -> int:
        """Batches per epoch (the same every epoch)."""
        return sum(ds.batch_count() for ds in self.datasets)

    @property
    def num_images(self) -> int:
        """Distinct images over all datasets."""
        return sum(len(ds.entries) for ds in self.datasets)

    def epoch_batches(self, epoch: int) -> list[BatchSpec]:
        """The batches of ``epoch`` (counted from 1) in training order; a pure function of (seed, epoch).

        With one bucket of one dataset the batches keep the bucket's shuffled order (shuffling them again
        adds nothing), so the batches of size N·B are the concatenations of N consecutive batches of size B
        (docs/distributed.md: a 1-process run equals an N-process run of the same global batch)."""
        rng = random.Random(f"sdtrain-batches:{self.seed}:{epoch}")
        batches = [b for i, ds in enumerate(self.datasets) for b in ds.epoch_batches(i, rng)]
        if len({(b.dataset, b.bucket) for b in batches}) > 1:
            rng.shuffle(batches)
        return batches

    def mark_failed(self, key: str) -> None:
        """Leave an image out from now on (it failed to load or encode)."""
        self._failed.add(key)

    def summary_lines(self) -> list[str]:
        """Start-up report for every dataset."""
        return [line for i, ds in enumerate(self.datasets) for line in ds.summary_lines(i)]

    # ---- building one batch -------------------------------------------------------------------

    def _pixels(self, ds: BucketedDataset, subset: BlueprintSubset, entry: ImageEntry, assignment: BucketAssignment,
                rng: random.Random) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        image = load_image_rgb(entry.path)
        if self.masks is not None:  # the loss mask rides along as a 4th channel through resize, crop and flip
            image = self.masks.attach(image, subset, entry.path)
        face = parse_face_info(entry.path) if subset.face_crop_aug_range else None
        if face is not None and not self.datasets_bucketed(ds):
            image, _ = face_crop_aug_range(image, face, assignment.bucket, subset.face_crop_aug_range,
                                           subset.random_crop, rng, subset.resize_interpolation)
        else:
            image, _ = resize_and_crop(image, assignment.bucket, assignment.resized_size, subset.random_crop, rng,
                                       subset.resize_interpolation)
        image, mask = (image, None) if self.masks is None else self.masks.detach(image)
        if subset.color_aug:
            image = color_aug(image, rng)
        flipped = False
        if subset.flip_aug:
            image, flipped = flip(image, rng)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        return tensor, flipped, (None if mask is None else self.masks.to_latent(mask, flipped))

    @staticmethod
    def datasets_bucketed(ds: BucketedDataset) -> bool:
        """True when the dataset uses aspect-ratio buckets (face crops apply only without them)."""
        return ds.settings.enable_bucket

    def _latent(self, key: tuple[int, int], entry: ImageEntry, subset: BlueprintSubset,
                rng: random.Random) -> tuple[torch.Tensor, bool]:
        cached = self.latents.get(key)
        if cached is None:
            from library.data.latents import load_latent_npz  # pre-computed fine-tuning latents

            flip_path = entry.latents_npz.with_name(entry.latents_npz.stem + "_flip.npz")
            cached = (load_latent_npz(entry.latents_npz),
                      load_latent_npz(flip_path) if subset.flip_aug and flip_path.exists() else None)
        latent, flipped_latent = cached
        use_flip = subset.flip_aug and flipped_latent is not None and rng.random() < 0.5
        return torch.from_numpy(np.asarray(flipped_latent if use_flip else latent, dtype=np.float32)), use_flip

    def uses_latents(self, dataset_index: int, entry_index: int) -> bool:
        """True when this entry trains from cached or pre-computed latents instead of pixels."""
        if (dataset_index, entry_index) in self.latents:
            return True
        return self.datasets[dataset_index].entries[entry_index].latents_npz is not None and self.precomputed_ok

    precomputed_ok: bool = False  # set by build_dataset_group when every fine-tuning npz can be used
    masks: Any = None  # a library.data.masks.MaskSource when the loss is masked (session.prepare_run)
    validation: "DatasetGroup | None" = None  # held-out images (library/training/validation.py split_validation)

    def load_batch(self, spec: BatchSpec, epoch: int, position: int, step: int = 0) -> dict[str, Any] | None:
        """Build the batch ``spec`` (the ``position``-th of ``epoch``); ``step`` drives token warm-up.

        Returns None when every image of the batch failed to load (each failure is logged once).
        """
        ds = self.datasets[spec.dataset]
        keys, captions, images, latents, flips, weights, sizes, is_reg = [], [], [], [], [], [], [], []
        masks, attributes, seeds = [], [], []
        for place, index in enumerate(spec.items):
            identity = sample_key(self.seed, epoch, spec, place)
            rng = random.Random(f"sdtrain-sample:{identity}")  # this sample's augmentations and caption
            entry = ds.entries[index]
            subset = ds.blueprint.subsets[entry.subset_index]
            if entry.key in self._failed:
                continue
            try:
                if self.uses_latents(spec.dataset, index):
                    latent, flipped = self._latent((spec.dataset, index), entry, subset, rng)
                    mask = None if self.masks is None else self.masks.fixed_crop_mask(
                        subset, entry, ds.assignments[index], flipped)
                    latents.append(latent)
                else:
                    pixels, flipped, mask = self._pixels(ds, subset, entry, ds.assignments[index], rng)
                    images.append(pixels)
                masks.append(mask)
            except ImageLoadError as exc:
                logger.warning("leaving out %s from now on: %s", exc.path, exc.reason)
                self._failed.add(entry.key)
                continue
            options = self._caption_options[spec.dataset][entry.subset_index]
            captions.append(process_caption(entry.caption, options, rng, epoch=epoch, step=step,
                                            replacements=self.replacements))
            keys.append(entry.key)
            seeds.append(noise_seed(identity))
            attributes.append(dict(subset.custom_attributes or {}))
            flips.append(flipped)
            weights.append(ds.blueprint.prior_loss_weight if entry.is_reg else 1.0)
            sizes.append(entry.size)
            is_reg.append(entry.is_reg)
        if not keys:
            return None
        if images and latents:
            raise RuntimeError("a batch mixes cached latents and pixels")  # prevented at build time
        batch: dict[str, Any] = {
            "keys": keys, "bucket_reso": spec.bucket, "captions": captions, "flipped": flips,
            "original_sizes": sizes, "is_reg": is_reg, "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "custom_attributes": attributes,  # each sample's subset custom_attributes (kohya passes them along)
            "noise_seeds": seeds,  # each sample's training-noise seed (the trainer's per-sample generators)
            "images": torch.stack(images) if images else None,
            "latents": torch.stack(latents) if latents else None,
        }
        if self.masks is not None:
            batch["masks"] = torch.stack(masks)  # (B, 1, h, w) at latent size (library/data/masks.py)
        if self.tokenizer is not None:
            if self.weighted_captions:
                # chunks as many as the batch's longest caption needs (the weighted path's rule)
                batch["input_ids"], batch["token_weights"] = tokenize_weighted_captions(
                    self.tokenizer, captions, self.max_token_length)
            else:
                batch["input_ids"] = torch.stack([tokenize_caption(self.tokenizer, c, self.max_token_length)
                                                  for c in captions])
        return batch


def check_cache_compatibility(blueprint: DatasetBlueprint, cache_latents: bool) -> None:
    """Refuse augmentations that cached latents cannot reproduce (they would be silently ignored)."""
    if not cache_latents:
        return
    for i, ds in enumerate(blueprint.datasets):
        for j, sub in enumerate(ds.subsets):
            for name in ("color_aug", "random_crop", "face_crop_aug_range"):
                if getattr(sub, name):
                    raise UserError(f"datasets[{i}].subsets[{j}]: '{name}' cannot be used with --cache_latents / "
                                    "--cache_latents_to_disk (latents are computed once from a centre crop); "
                                    "turn one of them off (flip_aug works with caching)")


def _precomputed_latents_usable(ds: BucketedDataset) -> bool:
    """Fine-tuning npz latents are used only when every image has them (and flips when flip_aug),
    every image has train_resolution, and no subset needs pixel augmentations."""
    if any(s.color_aug or s.random_crop for s in ds.blueprint.subsets):
        return False
    for entry in ds.entries:
        subset = ds.blueprint.subsets[entry.subset_index]
        if entry.latents_npz is None or entry.train_resolution is None:
            return False
        if subset.flip_aug and not entry.latents_npz.with_name(entry.latents_npz.stem + "_flip.npz").exists():
            return False
    return True


def scan_datasets(blueprint: DatasetBlueprint, use_size_index: bool = True) -> list[BucketedDataset]:
    """The image lists, captions and header sizes of every dataset of ``blueprint``, bucketed (the
    bucket plan); problems with single images are logged once. Raises :class:`UserError` for a dataset
    left with no usable image."""
    report = ScanReport()
    per_dataset = attach_sizes([dataset_entries(ds, report) for ds in blueprint.datasets], report,
                               use_index=use_size_index)
    report.log()
    datasets = []
    for i, (bp, entries) in enumerate(zip(blueprint.datasets, per_dataset)):
        if not entries:
            dirs = ", ".join(str(s.metadata_file or s.image_dir) for s in bp.subsets)
            raise UserError(f"dataset {i} ({dirs}) has no usable images")
        datasets.append(BucketedDataset(bp, entries))
    return datasets


def build_dataset_group(blueprint: DatasetBlueprint, *, seed: int, tokenizer: Any = None,
                        max_token_length: int | None = None, weighted_captions: bool = False,
                        use_size_index: bool = True) -> DatasetGroup:
    """Read every dataset of ``blueprint`` (image lists, captions, header sizes) and bucket it.

    Problems with single images are summarised once and those images left out; a dataset left with
    no image at all is an error naming it. With several processes the main process alone scans
    (:func:`scan_datasets`: captions, image headers, size index, ``cache_info`` file) and sends the
    bucketed datasets to the others (:func:`library.distributed.main_computes`).
    """
    datasets = main_computes(lambda: scan_datasets(blueprint, use_size_index), "the dataset scan")
    group = DatasetGroup(datasets, seed=seed, tokenizer=tokenizer, max_token_length=max_token_length,
                         weighted_captions=weighted_captions)
    finetuning = [ds for ds in datasets if any(e.latents_npz is not None for e in ds.entries)]
    group.precomputed_ok = bool(finetuning) and all(_precomputed_latents_usable(ds) for ds in finetuning)
    if finetuning and not group.precomputed_ok:
        logger.info("pre-computed .npz latents found but not usable for every image (missing npz/_flip.npz or "
                    "train_resolution, or color_aug/random_crop on); training from images instead")
    for line in group.summary_lines():
        logger.info("%s", line)
    return group

