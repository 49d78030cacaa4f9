"""Latent-caching benchmark: how long the VAE waits for decoded images, by loader worker count.

Usage: ``python bench/latent_cache.py [--dir /tmp/sdtrain_bench_latents] [--count 400] [--resolution 256]
[--batch-size 4] [--workers 0 1 2] [--loaders dataloader process thread] [--repeat 1]``.
The JPEGs (sides 512-1024 px, textured so they decode like photos) are generated once and reused (a
marker file records the count). Latents are cached in memory with the tiny-sd1 VAE on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.data.buckets import BucketSettings, assign_bucket  # noqa: E402
from library.data.images import list_images, read_image_size  # noqa: E402
from library.data.latents import CacheStats, LatentRequest, cache_latents  # noqa: E402


def _photo_like(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour gradients with blurred noise: a JPEG about as costly to decode as a photo."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    base = rng.uniform(0, 255, 3).astype(np.float32)
    slope = rng.uniform(-120, 120, (2, 3)).astype(np.float32)
    image = base + xs * slope[0] + ys * slope[1]
    noise = rng.normal(0, 40, (height // 4, width // 4, 3)).astype(np.float32)
    image += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate(folder: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` JPEGs with sides 512-1024 (steps of 32) into ``folder`` once."""
    marker = folder / f".complete_{count}"
    if marker.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sides = list(range(512, 1025, 32))
    start = time.perf_counter()
    for index in range(count):
        width, height = int(rng.choice(sides)), int(rng.choice(sides))
        image = _photo_like(width, height, rng)
        cv2.imwrite(str(folder / f"img_{index:05d}.jpg"), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    marker.write_text("ok\n")
    print(f"generated {count} images in {time.perf_counter() - start:.1f}s")


def build_requests(folder: Path, count: int, resolution: int) -> list[LatentRequest]:
    """Memory-only requests with buckets for ``resolution`` (bucketing on, steps of 64 or less)."""
    steps = max(8, min(64, resolution // 4) // 8 * 8)
    settings = BucketSettings(
        resolution=(resolution, resolution), enable_bucket=True,
        min_size=max(steps, resolution // 2), max_size=resolution * 2, reso_steps=steps,
    )
    resos = settings.candidate_resos()
    requests = []
    for path in list_images(folder)[:count]:
        assignment = assign_bucket(read_image_size(path), settings, resos)
        requests.append(LatentRequest(path, assignment.bucket, assignment.resized_size, flip=False, npz_path=None))
    return requests


def main() -> None:
    """Parse options, generate the images, run each configuration and print one line per run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sdtrain_bench_latents"))
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loaders", nargs="+", default=["dataloader"], choices=["dataloader", "process", "thread"])
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all configurations (best run of each is shown)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: default)")
    args = parser.parse_args()

    generate(args.dir, args.count)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    from library.models.random_model import build_random_model

    vae = build_random_model("tiny-sd1", seed=0).vae
    requests = build_requests(args.dir, args.count, args.resolution)
    buckets = len({r.bucket_reso for r in requests})
    print(f"{len(requests)} images, {buckets} buckets at {args.resolution}px, vae_batch_size {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    cache_latents(requests[:8], vae, batch_size=args.batch_size, workers=0, progress=False)  # warm-up
    configs = [(loader, w) for loader in args.loaders for w in args.workers if w > 0 or loader == args.loaders[0]]
    best: dict[tuple[str, int], CacheStats] = {}
    for _ in range(args.repeat):  # rounds interleave the configurations: fairer on a shared machine
        for loader, workers in configs:
            _, stats = cache_latents(requests, vae, batch_size=args.batch_size, workers=workers,
                                     progress=False, loader=loader)
            assert not stats.failed, stats.failed[:3]
            if (loader, workers) not in best or stats.total_seconds < best[loader, workers].total_seconds:
                best[loader, workers] = stats
    print(f"{'loader':<11}{'workers':>8}{'img/s':>9}{'total s':>9}{'VAE s':>8}{'wait s':>8}{'wait %':>8}")
    for (loader, workers), stats in best.items():
        name = loader if workers else "main"
        print(f"{name:<11}{workers:>8}{stats.encoded / stats.total_seconds:>9.1f}{stats.total_seconds:>9.2f}"
              f"{stats.vae_seconds:>8.2f}{stats.wait_seconds:>8.2f}{100 * stats.wait_share:>7.1f}%")

if __name__ == "__main__":
    main()
