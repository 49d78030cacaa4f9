"""Seconds per training step of each method: our loop versus the bare forward + backward + AdamW step.

    python bench/train_step.py [--preset tiny-sd1|sd1|both] [--method lora|db|ft|ti|xti|all]
                               [--steps 6] [--resolution 256] [--extra='--torch_compile ...']

Every method trains at batch 1 with AdamW and cached latents: ``lora`` a UNet-only LoRA (dim 4, alpha 1,
train_network.py), ``db`` DreamBooth (UNet + text encoder, train_db.py), ``ft`` fine-tuning (UNet only,
fine_tune.py), ``ti`` Textual Inversion (1 vector) and ``xti`` XTI (1 vector per layer). Each (method,
model) runs in a fresh process that times every optimizer step of our loop and, in the same process and
on the same modules, the bare floor: the text-encoder forward where the method trains it, the UNet
forward, MSE, backward, AdamW step and zero_grad on fixed tensors (no floor for xti). For ``lora`` and
``ti`` one floor step runs right after each of ours, so that both see the same machine (a shared 2-core
machine drifts by 10 % within minutes); ``ft`` and ``db`` run the floor after training, once our
optimizer's moments are freed (two sets of full-model moments would not fit beside each other). It prints
both, their ratio (target: at most 1.05) and the process's peak RSS; for ``ft`` and ``db`` also the
theoretical fp32 AdamW floor (frozen weights + 4 x trained weights: weights, gradients, two moments).
``lora`` and ``ft`` keep the text encoder frozen with fixed captions, so their steps reuse its outputs (the
automatic per-caption reuse, docs/te_cache.md) as the floor does with its fixed conditioning.
``lora`` also times launch to the first finished step (a fresh ``python train_network.py
--max_train_steps 1`` process, wall clock). The full-size ``sd1`` model is the one
bench/model_load_rss.py builds (random weights, 4 GB).
"""

from __future__ import annotations

import argparse
import gc
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


SCRIPTS = {"lora": "train_network", "db": "train_db", "ft": "fine_tune", "ti": "train_textual_inversion",
           "xti": "train_textual_inversion_XTI"}


def write_metadata(data: Path) -> Path:
    """fine_tune.py's metadata json for the bench images (captions only)."""
    import json

    folder = data / "1_bench"
    meta = {p.stem: {"caption": "a photo of a bench"} for p in sorted(folder.glob("*.png"))}
    path = data / "meta.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


def train_argv(method: str, model: Path, data: Path, out: Path, resolution: int, steps: int) -> list[str]:
    """The benchmark's command line for ``method``."""
    common = ["--pretrained_model_name_or_path", str(model), "--resolution", str(resolution), "--output_dir",
              str(out), "--cache_latents", "--optimizer_type", "AdamW", "--max_train_steps", str(steps), "--seed",
              "0", "--max_data_loader_n_workers", "0", "--train_batch_size", "1"]
    if method == "ft":
        return [*common, "--train_data_dir", str(data / "1_bench"), "--in_json", str(write_metadata(data)),
                "--learning_rate", "1e-6", "--save_model_as", "safetensors"]
    common += ["--train_data_dir", str(data)]
    if method == "lora":
        return [*common, "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1",
                "--network_train_unet_only", "--learning_rate", "1e-4"]
    if method == "db":
        return [*common, "--learning_rate", "1e-6", "--save_model_as", "safetensors"]
    return [*common, "--token_string", "zqxbench", "--init_word", "bench", "--learning_rate", "5e-3",
            "--use_object_template"]


INTERLEAVED = ("lora", "ti")  # small trained sets: a floor step runs after each of our steps (same conditions)


def measure_ours(method: str, argv: list[str], resolution: int) -> tuple[list[float], list[float], object]:
    """Run the method's main() in-process; return our per-step seconds, the interleaved floor's (methods in
    INTERLEAVED: one bare step right after each of ours, so both see the same machine) and the trainer."""
    import importlib

    from library.training import trainer as trainer_module
    from library.training import tracking

    script = importlib.import_module(SCRIPTS[method])
    ours: list[float] = []
    floor: list[float] = []
    captured: dict = {}
    original_step = tracking.Tracker.step
    original_init = trainer_module.Trainer.__init__

    def timed_step(self, *a, **k):
        ours.append(time.perf_counter() - captured["started"])
        result = original_step(self, *a, **k)
        if method in INTERLEAVED:
            if "bare" not in captured:
                captured["bare"] = BareStep(method, captured["trainer"], resolution)
            floor.append(captured["bare"].run())
        captured["started"] = time.perf_counter()
        return result

    def keep(self, *a, **k):
        original_init(self, *a, **k)
        captured["trainer"] = self
        captured["started"] = time.perf_counter()

    tracking.Tracker.step = timed_step
    trainer_module.Trainer.__init__ = keep
    try:
        assert script.main(argv) == 0
    finally:
        tracking.Tracker.step = original_step
        trainer_module.Trainer.__init__ = original_init
    return ours[1:], floor[1:], captured["trainer"]  # the first step includes the loop's start


class BareStep:
    """The floor: text-encoder forward where it trains, UNet forward + MSE + backward + AdamW, nothing else
    (``clip``: plus ``clip_grad_norm_``), on fixed tensors and the trainer's own modules."""

    def __init__(self, method: str, trainer, resolution: int, clip: float = 0.0):
        import torch

        self.unet, self.te = trainer.model.unet, trainer.model.text_encoder
        self.params, self.clip = trainer.params, clip
        self.opt = torch.optim.AdamW(self.params, lr=1e-6)
        g = torch.Generator().manual_seed(0)
        side = resolution // 8
        self.latents = torch.randn(1, 4, side, side, generator=g)
        self.noise = torch.randn(1, 4, side, side, generator=g)
        self.fixed_cond = torch.randn(1, 77, self.unet.config.cross_attention_dim, generator=g)
        self.ids = torch.randint(0, 49407, (1, 77), generator=g)
        self.te_trains = any(p.requires_grad for p in self.te.parameters())
        self.t = torch.tensor([500])

    def run(self) -> float:
        """One floor step; its seconds."""
        import torch

        start = time.perf_counter()
        cond = self.te(self.ids)[0] if self.te_trains else self.fixed_cond
        pred = self.unet(self.latents, self.t, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), self.noise)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def measure_bare(method: str, trainer, steps: int, resolution: int, clip: float = 0.0) -> list[float]:
    """``steps`` floor steps in a row (:class:`BareStep`)."""
    bare = BareStep(method, trainer, resolution, clip)
    times = [bare.run() for _ in range(steps)]
    del bare
    return times


def launch_to_first_step(argv: list[str]) -> float:
    """Wall seconds of a fresh process training one step (imports, model load, data, one step, save)."""
    argv = list(argv)
    argv[argv.index("--max_train_steps") + 1] = "1"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "train_network.py"), *argv], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def theoretical_bytes(trainer) -> tuple[int, int]:
    """(fp32 bytes of every model weight, of the trained ones): AdamW needs weights + grads + 2 moments."""
    model = trainer.model
    total = sum(p.numel() * 4 for m in (model.unet, model.text_encoder, model.vae) for p in m.parameters())
    trained = sum(p.numel() * 4 for p in trainer.params)
    return total, trained


def peak_rss_gib() -> float:
    """This process's peak resident set size."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_one(method: str, preset: str, steps: int, resolution: int, cache: Path, extra: list[str] = ()) -> None:
    """Measure one (method, preset) in this process and print its figures; ``extra`` options are added to
    the training command line (e.g. ``--torch_compile --dynamo_backend aot_eager``)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = make_images(tmp_path / "data", resolution)
        argv = [*train_argv(method, model_file(preset, cache), data, tmp_path / "out", resolution, steps + 2),
                *extra]
        launch = launch_to_first_step(argv) if method == "lora" else None
        ours, interleaved, trainer = measure_ours(method, argv, resolution)
        rss = peak_rss_gib()  # before a sequential floor's own optimizer adds its moments
        ours, interleaved = ours[1:], interleaved[1:]  # the first steps warm up allocators and caches
        total, trained = theoretical_bytes(trainer)
        # Free our optimizer's moments and gradients before the floor builds its own: for a whole-model run
        # both sets together (2 x 2 x 3.7 GB at full size) would crowd a 24 GB machine and slow the floor.
        trainer.optimizer.state.clear()
        trainer.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        bare = clipped = None
        if interleaved:
            bare = interleaved
        elif method != "xti":
            bare = measure_bare(method, trainer, len(ours) + 1, resolution)[1:]
            clip = trainer.step_settings.max_grad_norm
            if clip and trained > 2**28:  # clipping costs a pass over the gradients: worth showing for big models
                clipped = measure_bare(method, trainer, len(ours) + 1, resolution, clip=clip)[1:]
    o = statistics.median(ours)
    print(f"[{method} {preset}] {resolution}px batch 1, AdamW, cached latents: {SCRIPTS[method]}.py")
    print(f"  our step : {o:.4f} s (median of {len(ours)})")
    if bare:
        b = statistics.median(bare)
        how = "interleaved with ours" if interleaved else "after ours"
        print(f"  bare step: {b:.4f} s (TE fwd if trained + UNet fwd + bwd + AdamW; median of {len(bare)}, {how})")
        print(f"  ratio    : {o / b:.3f} (target <= 1.05)")
    if clipped:
        c = statistics.median(clipped)
        print(f"  bare step + gradient clipping (--max_grad_norm, on by default): {c:.4f} s; ratio {o / c:.3f}")
    print(f"  peak RSS : {rss:.2f} GiB (training only)")
    if method in ("ft", "db"):
        floor = (total + 3 * trained) / 2**30
        print(f"  fp32 AdamW floor: {floor:.2f} GiB (weights {total / 2**30:.2f} + 3 x trained {trained / 2**30:.2f}); "
              f"peak / floor = {rss / floor:.3f}")
    if launch is not None:
        print(f"  launch to first finished step: {launch:.1f} s (fresh process, includes one save)")
    sys.stdout.flush()


def main() -> int:
    """Parse options; run each (method, preset) in a fresh process so peak RSS is its own."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="both", choices=["tiny-sd1", "sd1", "both"])
    parser.add_argument("--method", default="all", choices=[*SCRIPTS, "all"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--cache", default="/tmp/sdtrain_bench_model")
    parser.add_argument("--extra", default="", help="extra training options as one string, written with '=' "
                        "because it starts with '--': --extra='--torch_compile --dynamo_backend aot_eager'")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.single:
        steps = args.steps if args.preset == "sd1" else max(args.steps, 30)
        bench_one(args.method, args.preset, steps, args.resolution, cache, args.extra.split())
        return 0
    for preset in (["tiny-sd1", "sd1"] if args.preset == "both" else [args.preset]):
        for method in (list(SCRIPTS) if args.method == "all" else [args.method]):
            subprocess.run([sys.executable, __file__, "--single", "--preset", preset, "--method", method, "--steps",
                            str(args.steps), "--resolution", str(args.resolution), "--cache", str(cache),
                            f"--extra={args.extra}"],
                           check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
