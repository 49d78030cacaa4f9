"""Dataset-scan benchmark: listing, header size reads, caption reads and bucket assignment.

Usage: ``python bench/dataset_scan.py [--dir /tmp/sdtrain_bench_20k] [--count 20000] [--workers N]
[--compare-pools]``. The images are generated once and reused (a marker file records the count).
Each image is a real JPEG (a few distinct encodes per size, written as bytes) with a ``.txt`` caption.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.data.buckets import BucketManager, BucketSettings  # noqa: E402
from library.data.captions import read_caption_file  # noqa: E402
from library.data.images import list_images, read_image_size, read_image_sizes  # noqa: E402

TAGS = ["1girl", "solo", "long hair", "smile", "outdoors", "sky", "cloud", "tree", "dress", "hat"]


def _encode_variants(width: int, height: int, rng: np.random.Generator, variants: int) -> list[bytes]:
    """A few distinct smooth JPEG encodes of one size (small files, real headers)."""
    out = []
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    for _ in range(variants):
        colour = rng.integers(0, 256, size=3)
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[:, :, 0] = ((xs + ys) / 2 + colour[0]) % 256
        image[:, :, 1] = (ys + colour[1]) % 256
        image[:, :, 2] = (xs + colour[2]) % 256
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 60])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out.append(data.tobytes())
    return out


def generate(folder: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` JPEGs (sides 256-1024 in steps of 32) and captions into ``folder`` once."""
    marker = folder / f".complete_{count}"
    if marker.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sides = list(range(256, 1025, 32))
    cache: dict[tuple[int, int], list[bytes]] = {}
    start = time.perf_counter()
    for index in range(count):
        size = (int(rng.choice(sides)), int(rng.choice(sides)))
        if size not in cache:
            cache[size] = _encode_variants(size[0], size[1], rng, variants=2)
        data = cache[size][index % 2]
        name = f"img_{index:05d}"
        (folder / f"{name}.jpg").write_bytes(data)
        tags = [TAGS[int(i)] for i in rng.choice(len(TAGS), size=4, replace=False)]
        (folder / f"{name}.txt").write_text(", ".join(tags) + "\n", encoding="utf-8")
    marker.write_text("ok\n")
    print(f"generated {count} images in {time.perf_counter() - start:.1f} s ({len(cache)} distinct sizes)")


def _thread_pool_sizes(paths: list[Path], workers: int) -> int:
    """Header reads with a thread pool (comparison only); returns the number read."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(1 for _ in pool.map(read_image_size, paths, chunksize=64))


def _timed(label: str, count: int, func, results: dict[str, float]):
    """Run ``func``, print its time and rate, record the time under ``label``."""
    start = time.perf_counter()
    value = func()
    elapsed = time.perf_counter() - start
    results[label] = elapsed
    print(f"{label:<28} {elapsed:8.3f} s   {count / elapsed:12,.0f} items/s")
    return value


def main(argv: list[str] | None = None) -> int:
    """Generate (once) and time the scan stages; prints one line per stage and the total."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/sdtrain_bench_20k")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=None, help="header-read processes (default: CPUs)")
    parser.add_argument(
        "--compare-pools", action="store_true", help="also time serial and thread-pool header reads"
    )
    args = parser.parse_args(argv)

    folder = Path(args.dir)
    generate(folder, args.count)
    results: dict[str, float] = {}

    paths = _timed("list images", args.count, lambda: list_images(folder), results)
    assert len(paths) == args.count, f"expected {args.count} images, found {len(paths)}"
    sizes, failures = _timed(
        "header sizes", len(paths), lambda: read_image_sizes(paths, args.workers), results
    )
    assert not failures, f"unexpected failures: {list(failures.items())[:3]}"
    if args.compare_pools:
        _timed("  compare: serial", len(paths), lambda: read_image_sizes(paths, workers=1), {})
        for threads in (2, 8):
            label = f"  compare: {threads} threads"
            _timed(label, len(paths), lambda n=threads: _thread_pool_sizes(paths, n), {})
    _timed(
        "caption reads",
        len(paths),
        lambda: [read_caption_file(p.with_suffix(".txt")) for p in paths],
        results,
    )

    def assign() -> BucketManager[Path]:
        manager: BucketManager[Path] = BucketManager(
            BucketSettings(resolution=(512, 512), enable_bucket=True)
        )
        for path in paths:
            manager.add_image(manager.select_bucket(*sizes[path]), path, repeats=10)
        manager.sort()
        manager.shuffle(random.Random(0))
        return manager

    manager = _timed("bucket assignment", len(paths), assign, results)
    total = sum(results.values())
    print(f"{'total':<28} {total:8.3f} s   {len(paths) / total:12,.0f} images/s")
    print(f"{len([b for b in manager.buckets if b])} non-empty buckets; {manager.summary_lines()[-1]}")
    print(f"cpu count: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
