"""Seconds per LoRA training step: our loop versus the bare UNet forward + backward + AdamW step.

    python bench/train_step.py [--preset tiny-sd1|sd1|both] [--steps 6] [--resolution 256]

For each model: trains a UNet-only LoRA (dim 4, alpha 1, AdamW, batch 1, cached latents) with
train_network.py in this process and times every optimizer step; then, in the same process and on the
same LoRA-applied UNet, times the bare floor (UNet forward, MSE, backward, AdamW step, zero_grad on
fixed tensors). Prints both and their ratio (target: at most 1.05). Also prints the time from launch to
the first finished step (a fresh ``python train_network.py --max_train_steps 1`` process, wall clock).
The full-size ``sd1`` model is the one bench/model_load_rss.py builds (random weights, 4 GB).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_images(folder: Path, resolution: int, count: int = 4) -> Path:
    """A DreamBooth-style folder of random images at the bench resolution."""
    import numpy as np
    from PIL import Image

    target = folder / "1_bench"
    target.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = (np.random.default_rng(i).random((resolution, resolution, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(target / f"{i}.png")
    return folder


def model_file(preset: str, cache: Path) -> Path:
    """The checkpoint for a preset, built once with tools/make_tiny_model.py."""
    path = cache / f"{preset}.safetensors"
    if not path.exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(cache), "--preset", preset,
                        "--formats", "safetensors"], check=True, stdout=subprocess.DEVNULL)
    return path


def train_argv(model: Path, data: Path, out: Path, resolution: int, steps: int) -> list[str]:
    """The benchmark's train_network.py command line."""
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution",
            str(resolution), "--output_dir", str(out), "--network_module", "networks.lora", "--network_dim", "4",
            "--network_alpha", "1", "--network_train_unet_only", "--cache_latents", "--optimizer_type", "AdamW",
            "--learning_rate", "1e-4", "--max_train_steps", str(steps), "--seed", "0", "--max_data_loader_n_workers",
            "0", "--train_batch_size", "1"]


def measure_ours(argv: list[str]) -> tuple[list[float], object]:
    """Run train_network.main in-process; return per-step seconds and the trainer."""
    import train_network
    from library.training import trainer as trainer_module
    from library.training import tracking

    stamps: list[float] = []
    captured = {}
    original_step = tracking.Tracker.step
    original_init = trainer_module.Trainer.__init__

    def timed_step(self, *a, **k):
        stamps.append(time.perf_counter())
        return original_step(self, *a, **k)

    def keep(self, *a, **k):
        original_init(self, *a, **k)
        captured["trainer"] = self
        stamps.append(time.perf_counter())

    tracking.Tracker.step = timed_step
    trainer_module.Trainer.__init__ = keep
    try:
        assert train_network.main(argv) == 0
    finally:
        tracking.Tracker.step = original_step
        trainer_module.Trainer.__init__ = original_init
    return [b - a for a, b in zip(stamps[1:], stamps[2:])], captured["trainer"]


def measure_bare(trainer, steps: int, resolution: int) -> list[float]:
    """UNet (with the LoRA applied) forward + MSE + backward + AdamW step, nothing else."""
    import torch

    unet = trainer.model.unet
    params = trainer.params
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, generator=g)
    noise = torch.randn(1, 4, side, side, generator=g)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        pred = unet(latents, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def launch_to_first_step(argv: list[str]) -> float:
    """Wall seconds of a fresh process training one step (imports, model load, data, one step, save)."""
    argv = list(argv)
    argv[argv.index("--max_train_steps") + 1] = "1"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "train_network.py"), *argv], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def bench(preset: str, steps: int, resolution: int, cache: Path) -> None:
    """Measure one preset and print its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = make_images(tmp_path / "data", resolution)
        argv = train_argv(model_file(preset, cache), data, tmp_path / "out", resolution, steps + 2)
        launch = launch_to_first_step(argv)
        ours, trainer = measure_ours(argv)
        ours = ours[2:]  # the first steps warm up allocators and caches
        bare = measure_bare(trainer, len(ours) + 1, resolution)[1:]
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"[{preset}] {resolution}px batch 1, UNet-only LoRA dim 4, AdamW, cached latents")
    print(f"  our step : {o:.4f} s (median of {len(ours)})")
    print(f"  bare step: {b:.4f} s (UNet fwd + bwd + AdamW)")
    print(f"  ratio    : {o / b:.3f} (target <= 1.05)")
    print(f"  launch to first finished step: {launch:.1f} s (fresh process, includes one save)")


def main() -> int:
    """Parse options and run the benches."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="both", choices=["tiny-sd1", "sd1", "both"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--cache", default="/tmp/sdtrain_bench_model")
    args = parser.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for preset in (["tiny-sd1", "sd1"] if args.preset == "both" else [args.preset]):
        bench(preset, args.steps if preset == "sd1" else max(args.steps, 30), args.resolution, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
