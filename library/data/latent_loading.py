"""Parallel image loading for latent caching: batches of one bucket, decoded and cropped while the VAE runs.

Image decoding, resizing and cropping run in a ``torch.utils.data.DataLoader`` over the batch list
(``num_workers=workers``, fork where available, 2 batches prefetched per worker) or, for the benchmark, a
bounded ``concurrent.futures`` pool. Split from :mod:`library.data.latents`, which drives it.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.data.images import ImageLoadError, load_image_rgb, resize_and_crop

Size = tuple[int, int]
_HASH_CHUNK = 1 << 20


def image_info(image_path: Path) -> dict[str, Any] | None:
    """Byte size, mtime (ns) and BLAKE2b-128 content hash of the source image (None if unreadable)."""
    try:
        stat = os.stat(image_path)
        hasher = hashlib.blake2b(digest_size=16)
        with open(image_path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                hasher.update(chunk)
    except OSError:
        return None
    return {"image_bytes": stat.st_size, "image_mtime_ns": stat.st_mtime_ns, "image_hash": hasher.hexdigest()}


# One work item: (request index, image path, bucket, resized size, want image info, resize interpolation).
_Item = tuple[int, str, Size, Size, bool, "str | None"]
# A loaded batch: (indices, uint8 (n, H, W, 3) or None, failures [(index, reason)], image infos).
Loaded = tuple[list[int], Any, list[tuple[int, str]], list["dict[str, Any] | None"]]


def make_batches(requests: Sequence[Any], todo: Iterable[int], batch_size: int) -> list[list[_Item]]:
    """``requests`` are :class:`library.data.latents.LatentRequest`\ s. Batches of at most ``batch_size`` items of one bucket, by bucket area then bucket (stable)."""
    order = sorted(todo, key=lambda i: (requests[i].bucket_reso[0] * requests[i].bucket_reso[1], requests[i].bucket_reso))
    batches: list[list[_Item]] = []
    current: list[_Item] = []
    for index in order:
        req = requests[index]
        if current and (current[-1][2] != tuple(req.bucket_reso) or len(current) >= batch_size):
            batches.append(current)
            current = []
        current.append((index, os.fspath(req.image_path), tuple(req.bucket_reso), tuple(req.resized_size),
                        req.npz_path is not None, req.interpolation))
    if current:
        batches.append(current)
    return batches


def _load_batch(items: list[_Item]) -> Loaded:
    """Decode, resize and centre-crop one batch; unreadable images are reported, not raised.

    Pure NumPy/Pillow/OpenCV (no torch op): a process forked after the parent used torch's OpenMP
    pool deadlocks in libgomp on its first parallel torch op (seen with a plain process pool here).
    """
    indices: list[int] = []
    crops: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    infos: list[dict[str, Any] | None] = []
    for index, path, bucket, resized, want_info, interpolation in items:
        info = image_info(Path(path)) if want_info else None  # before decoding: a later edit looks stale
        try:
            image = load_image_rgb(path)
        except ImageLoadError as exc:
            failures.append((index, exc.reason))
            continue
        crop, _ = resize_and_crop(image, bucket, resized, interpolation=interpolation)
        indices.append(index)
        crops.append(crop)
        infos.append(info)
    return indices, (np.stack(crops) if crops else None), failures, infos


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is loaded batch ``i`` (DataLoader runs it in workers)."""

    def __init__(self, batches: list[list[_Item]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Loaded:
        """Load batch ``index``; the pixels become a tensor so they travel through shared memory."""
        indices, images, failures, infos = _load_batch(self.batches[index])
        return indices, (None if images is None else torch.from_numpy(images)), failures, infos


def _identity(item: Any) -> Any:
    """DataLoader collate function: keep the loaded batch as it is."""
    return item


def _mp_context() -> multiprocessing.context.BaseContext:
    """``fork`` where available (cheap start, nothing re-imported), else the platform default.

    Workers must not reconfigure OpenCV: ``cv2.setNumThreads`` in a forked child tears down the thread
    pool inherited from the parent and deadlocks once the parent has resized an image (seen here).
    """
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _iter_executor(executor: Executor, batches: list[list[_Item]], window: int) -> Iterator[Loaded]:
    """Loaded batches in order from ``executor``, with at most ``window`` batches in flight."""
    pending: deque = deque()
    source = iter(batches)
    with executor:
        for items in source:
            pending.append(executor.submit(_load_batch, items))
            if len(pending) >= window:
                break
        while pending:
            loaded = pending.popleft().result()
            following = next(source, None)
            if following is not None:
                pending.append(executor.submit(_load_batch, following))
            yield loaded


def iter_loaded(batches: list[list[_Item]], workers: int, loader: str, pin_memory: bool) -> Iterator[Loaded]:
    """Loaded batches in order: in this process (``workers=0``) or by ``workers`` parallel workers."""
    if workers <= 0 or len(batches) <= 1:
        return (_load_batch(items) for items in batches)
    if loader == "dataloader":
        return iter(torch.utils.data.DataLoader(
            _BatchDataset(batches), batch_size=None, shuffle=False, num_workers=workers,
            collate_fn=_identity, prefetch_factor=2,
            multiprocessing_context=_mp_context(), pin_memory=pin_memory,
        ))
    if loader == "process":
        pool: Executor = ProcessPoolExecutor(workers, mp_context=_mp_context())
    elif loader == "thread":
        pool = ThreadPoolExecutor(workers)
    else:
        raise ValueError(f"unknown loader {loader!r} (dataloader, process or thread)")
    return _iter_executor(pool, batches, 2 * workers)


def default_latent_workers() -> int:
    """Loader workers used by :func:`cache_latents` by default: usable CPUs minus one, 1 to 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus - 1))
