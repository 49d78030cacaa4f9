"""Pieces shared by the captioning and tagging scripts: finding images, loading them in parallel
batches with per-file error reporting, timing the loader, and writing one text file per image.

Loading: each batch of paths is decoded (``library.data.images.load_image_rgb``: RGB, EXIF upright,
transparency composited on white) and passed through the caller's ``preprocess`` function, either in
this process (``workers`` None or 0) or in a ``torch.utils.data.DataLoader`` with ``workers`` worker
processes (``fork`` where available, 2 batches prefetched per worker, so memory stays bounded) while the
main process runs the model. A file that cannot be decoded is reported with a warning naming it and
left out of its batch; it never stops the run.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.data.images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image_rgb
from library.errors import UserError
from library.fileio import atomic_write_text

logger = logging.getLogger(__name__)

Preprocess = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------------
# finding images and naming outputs


def find_images(train_data_dir: str, recursive: bool) -> list[Path]:
    """The images of ``train_data_dir`` (sub-folders too when ``recursive``), sorted by path.

    Raises UserError when the folder does not exist.
    """
    if not os.path.isdir(train_data_dir):
        raise UserError(f"train_data_dir {train_data_dir!r} is not a folder")
    paths = list_images(train_data_dir, recursive)
    logger.info("found %d images in %s%s", len(paths), train_data_dir, " (recursive)" if recursive else "")
    return paths


def output_extension(caption_extension: str, caption_extention: str | None) -> str:
    """The extension of the written files: the legacy ``--caption_extention`` wins when given.

    Raises UserError for an empty extension or an image extension (that would overwrite the images).
    """
    extension = caption_extention if caption_extention is not None else caption_extension
    option = "--caption_extention" if caption_extention is not None else "--caption_extension"
    if not extension:
        raise UserError(f"{option} must not be empty (e.g. .txt or .caption)")
    if extension.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"{option} {extension!r} is an image extension: the outputs would overwrite the images; "
                        "use e.g. .txt or .caption")
    return extension


def text_path(image_path: Path, extension: str) -> Path:
    """``<image path without its last extension><extension>`` (the reference's output name)."""
    return Path(os.path.splitext(os.fspath(image_path))[0] + extension)


def warn_shared_outputs(paths: Sequence[Path], extension: str) -> None:
    """Warn when several images (``a.png``, ``a.jpg``) write the same output file; the last one wins."""
    owners: dict[Path, list[Path]] = {}
    for path in paths:
        owners.setdefault(text_path(path, extension), []).append(path)
    for target, images in owners.items():
        if len(images) > 1:
            names = ", ".join(p.name for p in images)
            logger.warning("%s are all written to %s; the last one (%s) wins", names, target, images[-1].name)


def keep_existing_outputs(paths: Sequence[Path], extension: str, overwrite: bool) -> list[Path]:
    """The images still to process: those whose output file exists are left out (their files are kept, as
    the user may have edited them) unless ``overwrite``; says how many were kept."""
    if overwrite:
        return list(paths)
    todo = [p for p in paths if not text_path(p, extension).exists()]
    if len(todo) < len(paths):
        logger.info("%d image(s) already have a %s file: kept as they are (--overwrite replaces them)",
                    len(paths) - len(todo), extension)
    return todo


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace existing output files instead of keeping them."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing caption/tag files (default: images that have one are skipped)")


def write_text_file(image_path: Path, extension: str, text: str) -> Path:
    """Write ``text`` plus a newline, UTF-8, atomically to the image's output file; returns its path."""
    target = text_path(image_path, extension)
    try:
        atomic_write_text(target, text + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target


def check_positive(value: int, option: str) -> None:
    """UserError unless ``value`` >= 1 (for ``--batch_size`` and the like)."""
    if value < 1:
        raise UserError(f"{option} must be at least 1, got {value}")


def check_workers(value: int | None) -> int:
    """``--max_data_loader_n_workers`` as a worker count (None means 0: load in the main process)."""
    if value is None:
        return 0
    if value < 0:
        raise UserError(f"--max_data_loader_n_workers must be 0 or more, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# loading batches


@dataclass
class ImageBatch:
    """One loaded batch: ``pixels[i]`` is the preprocessed ``paths[i]``; ``failures`` lists the files
    of the batch that could not be read as ``(path, reason)``. ``pixels`` is None when none could."""

    paths: list[Path]
    pixels: torch.Tensor | None
    failures: list[tuple[Path, str]] = field(default_factory=list)


def load_batch(paths: Sequence[Path], preprocess: Preprocess) -> ImageBatch:
    """Decode and preprocess ``paths``; unreadable files go to ``failures`` instead of raising.

    The stacked result is a tensor, so DataLoader workers hand it over through shared memory.
    """
    loaded: list[Path] = []
    arrays: list[np.ndarray] = []
    failures: list[tuple[Path, str]] = []
    for path in paths:
        try:
            image = load_image_rgb(path)
        except ImageLoadError as exc:
            failures.append((Path(path), exc.reason))
            continue
        loaded.append(Path(path))
        arrays.append(np.ascontiguousarray(preprocess(image)))
    pixels = torch.from_numpy(np.stack(arrays)) if arrays else None
    return ImageBatch(loaded, pixels, failures)


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is loaded batch ``i`` (run in DataLoader workers)."""

    def __init__(self, batches: list[list[Path]], preprocess: Preprocess) -> None:
        self.batches = batches
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> ImageBatch:
        return load_batch(self.batches[index], self.preprocess)


def _keep(item: ImageBatch) -> ImageBatch:
    """DataLoader collate function: the loaded batch as it is."""
    return item


def _mp_context() -> multiprocessing.context.BaseContext:
    """``fork`` where available (cheap start, nothing re-imported), else the platform default."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def iter_image_batches(
    paths: Sequence[Path], preprocess: Preprocess, batch_size: int, workers: int
) -> Iterator[ImageBatch]:
    """Batches of at most ``batch_size`` images in path order, loaded by ``workers`` processes.

    ``workers <= 0`` (or a single batch) loads in this process. Every unreadable file is logged as a
    warning naming it, once, when its batch arrives; the batch then holds fewer images.
    """
    batches = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    if workers <= 0 or len(batches) <= 1:
        source: Iterator[ImageBatch] = (load_batch(items, preprocess) for items in batches)
    else:
        source = iter(torch.utils.data.DataLoader(
            _BatchDataset(batches, preprocess), batch_size=None, shuffle=False, num_workers=workers,
            collate_fn=_keep, prefetch_factor=2, multiprocessing_context=_mp_context(),
            generator=torch.Generator(),  # leaves the global RNG (the caption seed) untouched
        ))
    for batch in source:
        for path, reason in batch.failures:
            logger.warning("skipping %s: %s", path, reason)
        yield batch


# --------------------------------------------------------------------------------------------------
# timing


@dataclass
class RunStats:
    """Counts and timings of a captioning/tagging run.

    ``wait_seconds`` is the time the main process sat blocked on the image loader (with no workers
    that is all the decoding), ``model_seconds`` the time in the model, ``total_seconds`` the wall time
    of the loop (writing files included).
    """

    written: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    wait_seconds: float = 0.0
    model_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Images written per second of wall time (0 when nothing ran)."""
        return self.written / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def wait_share(self) -> float:
        """Share of the wall time the model waited for images."""
        return self.wait_seconds / self.total_seconds if self.total_seconds > 0 else 0.0

    def summary(self, what: str) -> str:
        """One line for the log."""
        return (f"{self.written} {what} written, {len(self.failed)} unreadable images skipped in {self.total_seconds:.1f}s "
                f"({self.images_per_second:.1f} images/s; model {self.model_seconds:.1f}s, "
                f"waiting for images {self.wait_seconds:.1f}s)")


def report_failures(stats: RunStats, what: str) -> None:
    """Warn once at the end about the images that could not be read (the first ten named)."""
    if stats.failed:
        names = ", ".join(str(p) for p, _ in stats.failed[:10]) + (" ..." if len(stats.failed) > 10 else "")
        logger.warning("%d image(s) could not be read and have no %s: %s", len(stats.failed), what, names)


def timed_batches(batches: Iterator[ImageBatch], stats: RunStats) -> Iterator[ImageBatch]:
    """Yield from ``batches``, adding the time blocked on each one to ``stats.wait_seconds`` and its
    failures to ``stats.failed``."""
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        stats.wait_seconds += time.perf_counter() - start
        stats.failed.extend(batch.failures)
        yield batch


def caption_with(captioner: Any, paths: list[Path], extension: str, *, batch_size: int, workers: int,
                 debug: bool) -> RunStats:
    """Caption ``paths`` batch by batch and write one text file per image.

    ``captioner`` gives ``preprocess()`` (the per-image function for :func:`iter_image_batches`) and
    ``caption(pixels)`` (one text per image of the batch); BLIP and GIT share this loop.
    """
    from tqdm import tqdm

    stats = RunStats()
    start = time.perf_counter()
    batches = iter_image_batches(paths, captioner.preprocess(), batch_size, workers)
    with tqdm(total=len(paths), desc="captions", unit="img", smoothing=0.0) as progress:
        for batch in timed_batches(batches, stats):
            progress.update(len(batch.paths) + len(batch.failures))
            if batch.pixels is None:
                continue
            model_start = time.perf_counter()
            captions = captioner.caption(batch.pixels)
            stats.model_seconds += time.perf_counter() - model_start
            for path, caption in zip(batch.paths, captions, strict=True):
                write_text_file(path, extension, caption)
                stats.written += 1
                if debug:
                    tqdm.write(f"{path} {caption}")
    stats.total_seconds = time.perf_counter() - start
    return stats


def caption_folder(args: argparse.Namespace, extension: str,
                   caption_images: Callable[[argparse.Namespace, list[Path], str], RunStats]) -> int:
    """The captioning scripts' run: find the images of ``args.train_data_dir``, keep existing caption
    files unless ``--overwrite``, caption the rest with ``caption_images``, report. Returns the exit code."""
    paths = images_to_write(args, extension)
    if not paths:
        return 0
    stats = caption_images(args, paths, extension)
    logger.info(stats.summary("captions"))
    report_failures(stats, "caption")
    return 0


def images_to_write(args: argparse.Namespace, extension: str) -> list[Path]:
    """The images of ``args.train_data_dir`` (``--recursive``) whose text file is to be written: all with
    ``--overwrite``, else those without one (warning when two images share one text file)."""
    paths = find_images(args.train_data_dir, args.recursive)
    if not paths:
        logger.warning("no images found in %s; nothing to do", args.train_data_dir)
        return []
    warn_shared_outputs(paths, extension)
    return keep_existing_outputs(paths, extension, args.overwrite)
