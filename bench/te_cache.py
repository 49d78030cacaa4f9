"""Seconds per LoRA step with and without the text-encoder output cache (--cache_text_encoder_outputs).

    python bench/te_cache.py [--preset tiny-sd1|sd1] [--steps 8] [--resolution 256] [--batch_size 1]
                             [--max_token_length 75|150|225]

A UNet-only LoRA (train_network.py, dim 4, AdamW, cached latents) on a folder of random images, each with
its own caption, trained in fresh processes, alternately encoding the captions every step
(``--no_cache_text_encoder_outputs``, which also turns the automatic reuse off) and using the cache
(``--repeats`` times each). Each run times every optimizer step (data, text encoder or cache lookup, UNet forward and
backward, optimizer) and the cache's build time. It prints the medians, the time saved per step and after
how many steps the cache has paid for itself. ``sd1`` is the full SD1.5 architecture with random
weights, built once by tools/make_tiny_model.py --preset sd1 (about 4 GB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train_step import model_file  # noqa: E402

WORDS = ("photo portrait dog cat house tree river mountain red blue green sitting running under over near "
         "bright dark old new small large wooden stone glass light shadow morning evening").split()


def make_data(folder: Path, resolution: int, count: int) -> Path:
    """``folder/1_bench/`` with ``count`` random images and a different 20-word caption for each."""
    import numpy as np
    from PIL import Image

    target = folder / "1_bench"
    target.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((resolution, resolution, 3)) * 255).astype(np.uint8)).save(target / f"{i}.png")
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 20)]
        (target / f"{i}.caption").write_text(", ".join(words), encoding="utf-8")
    return folder


def time_run(argv: list[str]) -> dict[str, object]:
    """Run train_network.main in this process; per-step seconds (between optimizer steps) and cache build."""
    from library.training import session, tracking
    from train_network import main

    stamps: list[float] = []
    build: list[float] = []
    original_step, original_build = tracking.Tracker.step, session.build_text_encoder_cache

    def timed_step(self, *a, **k):
        stamps.append(time.perf_counter())
        return original_step(self, *a, **k)

    def timed_build(*a, **k):
        start = time.perf_counter()
        try:
            return original_build(*a, **k)
        finally:
            build.append(time.perf_counter() - start)
            stamps.append(time.perf_counter())  # the first step is timed from the end of set-up

    tracking.Tracker.step, session.build_text_encoder_cache = timed_step, timed_build
    try:
        assert main(argv) == 0
    finally:
        tracking.Tracker.step, session.build_text_encoder_cache = original_step, original_build
    return {"steps": [b - a for a, b in zip(stamps, stamps[1:])], "build": build[0] if build else 0.0}


def single(args: argparse.Namespace) -> None:
    """One timed run (called in a fresh process); prints a JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", args.resolution, args.images)
        argv = ["--pretrained_model_name_or_path", str(model_file(args.preset, Path(args.cache))),
                "--train_data_dir", str(data), "--resolution", str(args.resolution), "--output_dir",
                str(Path(tmp) / "out"), "--network_module", "networks.lora", "--network_dim", "4",
                "--network_train_unet_only", "--cache_latents", "--optimizer_type", "AdamW", "--learning_rate",
                "1e-4", "--max_train_steps", str(args.steps + 2), "--seed", "0", "--max_data_loader_n_workers", "0",
                "--train_batch_size", str(args.batch_size)]
        if args.max_token_length:
            argv += ["--max_token_length", str(args.max_token_length)]
        # the uncached variant turns the automatic per-caption reuse off as well
        argv.append("--cache_text_encoder_outputs" if args.cached else "--no_cache_text_encoder_outputs")
        result = time_run(argv)
    print(json.dumps({"steps": result["steps"][2:], "build": result["build"]}))


def main() -> int:
    """Run the uncached and the cached variant in fresh processes and compare them."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="tiny-sd1", choices=["tiny-sd1", "sd1"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps (two more warm up)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--max_token_length", type=int, default=None, choices=[75, 150, 225])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache", default="/tmp/sdtrain_bench_model", help="folder for the built model")
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.single:
        single(args)
        return 0
    results: dict[bool, dict] = {False: {"steps": [], "build": []}, True: {"steps": [], "build": []}}
    for _ in range(args.repeats):  # alternate the variants so load from other processes hits both alike
        for cached in (False, True):
            command = [sys.executable, __file__, "--single", *sys.argv[1:]] + (["--cached"] if cached else [])
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            results[cached]["steps"] += run["steps"]
            results[cached]["build"].append(run["build"])
    plain, cached = (statistics.median(results[c]["steps"]) for c in (False, True))
    build = statistics.median(results[True]["build"])
    print(f"[te_cache {args.preset}] LoRA (UNet only, dim 4, AdamW), {args.resolution}px, batch {args.batch_size}, "
          f"{args.images} images with distinct captions, max_token_length {args.max_token_length or 75}")
    print(f"  step without cache: {plain:.4f} s (median of {len(results[False]['steps'])})")
    print(f"  step with cache   : {cached:.4f} s (median of {len(results[True]['steps'])})")
    saved = plain - cached
    print(f"  saved per step    : {saved:.4f} s ({100 * saved / plain:.1f} %)")
    payback = f"{build / saved:.1f} steps" if saved > 0 else "never"
    print(f"  cache build       : {build:.3f} s for {args.images} captions (pays back after {payback})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
