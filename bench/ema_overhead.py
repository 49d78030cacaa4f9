"""Seconds per LoRA step without EMA, with ``--ema`` on the training device and with ``--ema_device cpu``.

    python bench/ema_overhead.py [--preset tiny-sd1|sd1] [--steps 20] [--resolution 256] [--network_dim 8]

Each variant trains train_network.py in a fresh process (batch 1, AdamW, cached latents, a LoRA on the UNet
and the text encoder) and times every optimizer step of the loop; the EMA runs also time the EMA update
itself (``ExponentialMovingAverage.update``, with a device synchronisation on CUDA so the time is real).
It prints the median step time of each variant, the median EMA update time, and the overhead against the
run without EMA both ways (step-time difference, and update time / plain step). Target: at most 5 %.
``--preset sd1`` builds the full SD1.5 architecture with random weights (4 GB, tools/make_tiny_model.py)
once into ``--cache``.
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

from bench.train_step import make_images, model_file  # noqa: E402

VARIANTS = {"none": [], "ema": ["--ema", "--save_ema"], "ema_cpu": ["--ema", "--save_ema", "--ema_device", "cpu"]}


def measure(variant: str, model: Path, resolution: int, steps: int, dim: int) -> dict:
    """Train in this process; return per-step seconds and per-update EMA seconds."""
    import torch

    import train_network
    from library.training import ema as ema_module
    from library.training import tracking

    stamps: list[float] = []
    updates: list[float] = []
    original_step, original_update = tracking.Tracker.step, ema_module.ExponentialMovingAverage.update
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed_step(self, *a, **k):
        sync()
        stamps.append(time.perf_counter())
        return original_step(self, *a, **k)

    def timed_update(self, *a, **k):
        sync()
        start = time.perf_counter()
        result = original_update(self, *a, **k)
        sync()
        updates.append(time.perf_counter() - start)
        return result

    tracking.Tracker.step = timed_step
    ema_module.ExponentialMovingAverage.update = timed_update
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_images(Path(tmp) / "data", resolution)
            argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution",
                    str(resolution), "--output_dir", str(Path(tmp) / "out"), "--cache_latents", "--optimizer_type",
                    "AdamW", "--max_train_steps", str(steps), "--seed", "0", "--max_data_loader_n_workers", "0",
                    "--train_batch_size", "1", "--network_module", "networks.lora", "--network_dim", str(dim),
                    "--learning_rate", "1e-4", *VARIANTS[variant]]
            assert train_network.main(argv) == 0
    finally:
        tracking.Tracker.step, ema_module.ExponentialMovingAverage.update = original_step, original_update
    skip = min(3, max(0, len(stamps) - 3))  # the first steps warm up allocators and caches
    return {"steps": [b - a for a, b in zip(stamps[skip:], stamps[skip + 1:])], "updates": updates[skip + 1:]}


def run_variant(variant: str, args: argparse.Namespace, model: Path) -> dict:
    """One variant in a fresh process (its own memory and caches)."""
    res = subprocess.run([sys.executable, __file__, "--single", variant, "--preset", args.preset, "--steps",
                          str(args.steps), "--resolution", str(args.resolution), "--network_dim",
                          str(args.network_dim), "--cache", str(args.cache)],
                         check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    """Parse options; run the three variants; print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="tiny-sd1", choices=["tiny-sd1", "sd1"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--network_dim", type=int, default=8)
    parser.add_argument("--cache", default="/tmp/sdtrain_bench_model")
    parser.add_argument("--single", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = model_file(args.preset, cache)
    if args.single:
        print(json.dumps(measure(args.single, model, args.resolution, args.steps, args.network_dim)))
        return 0
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    results = {v: run_variant(v, args, model) for v in VARIANTS}
    plain = statistics.median(results["none"]["steps"])
    print(f"LoRA dim {args.network_dim} (UNet + text encoder), {args.preset}, {args.resolution}px, batch 1, AdamW, "
          f"cached latents, on {device}")
    print(f"  no EMA          : {plain:.4f} s/step (median of {len(results['none']['steps'])})")
    for variant, label in (("ema", "--ema (same dev)"), ("ema_cpu", "--ema_device cpu")):
        step = statistics.median(results[variant]["steps"])
        update = statistics.median(results[variant]["updates"]) if results[variant]["updates"] else float("nan")
        print(f"  {label:16}: {step:.4f} s/step; EMA update {update * 1000:.2f} ms = {update / plain:.2%} of a plain "
              f"step; step-time difference {(step - plain) / plain:+.2%} (target <= 5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
