"""prepare_buckets_latents benchmark: throughput and VAE idle time with 0 and 2 image-loading workers.

Usage: ``python bench/prepare_latents.py [--dir /tmp/sdtrain_bench_prepare] [--count 200]
[--resolution 256] [--batch-size 4] [--workers 0 2] [--repeat 1] [--torch-threads 1]``.

Writes ``count`` JPEGs of mixed sizes and aspect ratios (sides 384-1024 px, textured so they decode like
photos) and the tiny-sd1 model once, then runs the script's whole pipeline (header scan, bucketing,
decoding/resizing in workers, VAE on the CPU, npz writing, metadata) for each worker count, re-encoding
every image each run. Prints images per second of the encoding loop, the share of that time the VAE
waited for decoded images, and the wall time of the whole run (VAE loading included).

``--torch-threads`` (default 1) fixes the VAE's CPU threads: on a shared 2-core machine two OpenMP
threads competing with other processes and the loader workers ran the tiny VAE 8x slower (37 vs 4.4 ms
per 64 px image), which hides the loader's effect; one thread also mimics a GPU VAE that leaves the
CPU to the loaders.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def textured_image(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A colour gradient with smoothed noise: JPEG decoding costs about what a photo costs."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    image = rng.uniform(0, 255, 3).astype(np.float32) + xs * rng.uniform(-100, 100, 3) + ys * rng.uniform(-100, 100, 3)
    coarse = rng.normal(0, 35, (max(1, height // 8), max(1, width // 8), 3)).astype(np.float32)
    image += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs with sides 384-1024 px in steps of 16 (landscape, portrait and square mixed), once."""
    marker = folder / f".images_{count}"
    if marker.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for index in range(count):
        width, height = (int(rng.integers(24, 65)) * 16 for _ in range(2))
        cv2.imwrite(str(folder / f"photo_{index:05d}.jpg"), textured_image(width, height, rng)[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    marker.write_text("ok\n", encoding="utf-8")
    print(f"generated {count} JPEGs in {time.perf_counter() - started:.1f}s")


def make_model(folder: Path) -> Path:
    """The tiny-sd1 ldm file (written once)."""
    from tools.make_tiny_model import main as make_tiny_model

    path = folder / "tiny-sd1.safetensors"
    if not path.exists():
        assert make_tiny_model([str(folder), "--preset", "tiny-sd1", "--formats", "safetensors"]) == 0
    return path


def main() -> None:
    """Parse options, prepare inputs, run the pipeline once per worker count and repeat, print results."""
    from finetune.prepare_buckets_latents import build_parser, prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sdtrain_bench_prepare"))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads for the VAE (0: torch default)")
    opts = parser.parse_args()
    if opts.torch_threads > 0:
        import torch

        torch.set_num_threads(opts.torch_threads)
    logging.basicConfig(level=logging.WARNING)

    images = opts.dir / f"images_{opts.count}"
    make_images(images, opts.count)
    model = make_model(opts.dir / "model")
    meta_in = opts.dir / "meta_in.json"
    meta_in.write_text(json.dumps({}), encoding="utf-8")
    steps = max(8, min(64, opts.resolution // 4) // 8 * 8)
    print(f"{opts.count} JPEGs, max_resolution {opts.resolution}, bucket steps {steps}, batch {opts.batch_size}, "
          f"tiny-sd1 VAE on the CPU ({'default' if opts.torch_threads <= 0 else opts.torch_threads} torch threads)")
    for _ in range(opts.repeat):
        for workers in opts.workers:
            argv = [str(images), str(meta_in), str(opts.dir / "meta_out.json"), str(model), "--full_path",
                    "--max_resolution", f"{opts.resolution},{opts.resolution}",
                    "--min_bucket_reso", str(max(steps, opts.resolution // 2 // steps * steps)),
                    "--max_bucket_reso", str(opts.resolution * 2), "--bucket_reso_steps", str(steps),
                    "--batch_size", str(opts.batch_size), "--max_data_loader_n_workers", str(workers)]
            started = time.perf_counter()
            result = prepare(build_parser().parse_args(argv), progress=False)
            wall = time.perf_counter() - started
            stats = result.stats
            rate = stats.encoded / stats.total_seconds if stats.total_seconds else 0.0
            print(f"workers={workers}: {rate:6.1f} img/s encoding loop, VAE waited {stats.wait_share:5.1%} "
                  f"({stats.wait_seconds:.2f}s of {stats.total_seconds:.2f}s; VAE {stats.vae_seconds:.2f}s, "
                  f"writing {stats.write_seconds:.2f}s), whole run {wall:.2f}s, {len(result.failed)} failed")


if __name__ == "__main__":
    main()
