"""Data-parallel scaling: throughput of 1, 2, 4 ... processes for LoRA and full fine-tuning, per engine.

    python bench/scaling.py [--processes 1,2] [--method lora,ft] [--preset tiny-sd1] [--resolution 64]
                            [--batch_size 1] [--steps 12] [--threads 1] [--device cpu|gpu]
                            [--engine ddp,zero2,zero2-offload,zero3,zero3-offload,fsdp]
                            [--mixed_precision no|bf16] [--gradient_checkpointing]

``--engine`` picks how the processes train (docs/distributed.md): ``ddp`` plain data parallelism (one process:
no wrapper), ``zero2`` / ``zero3`` ``--deepspeed --zero_stage N``, ``zero2-offload`` with the optimizer on the
CPU, ``zero3-offload`` with the optimizer and the weights on the CPU, ``fsdp`` an FSDP2 accelerate config
(full shard). On a GPU each process also records its peak GPU memory (``torch.cuda.max_memory_allocated``).
The GPU case of issue 16, full fine-tuning of the full-size SD1.5 architecture at 512 px, batch 4, bf16:

    python bench/scaling.py --device gpu --preset sd1 --resolution 512 --batch_size 4 --method ft \
        --processes 1 --engine ddp,zero2-offload,zero3-offload --mixed_precision bf16 --gradient_checkpointing \
        --steps 5 --warmup 2

For every (method, process count) a fresh ``accelerate launch --num_processes N`` runs the real entry script
(``lora``: train_network.py, UNet-only LoRA dim 4; ``ft``: fine_tune.py, the whole UNet; both AdamW, cached
latents, batch ``--batch_size`` per process, the commands of bench/train_step.py) on a random-weight model
of ``--preset`` built by tools/make_tiny_model.py. Every process times its optimizer steps (the first
``--warmup`` steps are left out) and records its peak RSS; the table shows, per run: steps/s (optimizer
steps of the run, from the slowest process), images/s (steps/s x batch x processes), the peak RSS of each
process, and the scaling efficiency: images/s divided by (processes x the one-process images/s).

On the CPU (``--device cpu``, the default; gloo) each process gets ``--threads`` torch threads, so N
processes need N x threads free cores to scale; on a machine with fewer cores the efficiency measures the
contention, not the trainer. ``--device gpu`` launches one process per GPU (nccl).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train_step import SCRIPTS, make_images, model_file, train_argv  # noqa: E402

METHODS = {"lora": "LoRA (UNet only, dim 4)", "ft": "full fine-tuning (UNet)"}
# --engine name -> the entry script's options (fsdp: an accelerate config instead)
ENGINES = {
    "ddp": [],
    "zero2": ["--deepspeed", "--zero_stage", "2"],
    "zero2-offload": ["--deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "cpu"],
    "zero3": ["--deepspeed", "--zero_stage", "3"],
    "zero3-offload": ["--deepspeed", "--zero_stage", "3", "--offload_optimizer_device", "cpu",
                      "--offload_param_device", "cpu"],
    "fsdp": [],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(method: str, record: Path, argv: list[str]) -> int:
    """Inside one launched process: run the entry script's main() with its optimizer steps timed, then
    write ``record/rank<r>.json`` (step end times, peak RSS in bytes)."""
    import importlib

    from library.training import tracking

    stamps: list[float] = []
    original = tracking.Tracker.step

    def timed(self, *a, **k):
        stamps.append(time.perf_counter())
        return original(self, *a, **k)

    tracking.Tracker.step = timed
    start = time.perf_counter()
    try:
        code = importlib.import_module(SCRIPTS[method]).main(argv)
    finally:
        tracking.Tracker.step = original
    rank = int(os.environ.get("RANK", "0") or 0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    import torch

    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    (record / f"rank{rank}.json").write_text(json.dumps({"stamps": [s - start for s in stamps], "peak_rss": peak,
                                                         "peak_gpu": gpu}))
    return code


def fsdp_config(path: Path, processes: int, mixed_precision: str) -> Path:
    """An accelerate FSDP2 config (full shard) for ``processes`` processes, written to ``path``."""
    from library.training.fsdp_config import fsdp2_accelerate_config

    path.write_text(fsdp2_accelerate_config(processes, mixed_precision), encoding="utf-8")
    return path


def run_one(method: str, processes: int, args: argparse.Namespace, model: Path, data: Path, work: Path,
            engine: str = "ddp") -> dict:
    """Launch one run; returns its figures (see the module docstring)."""
    record = Path(tempfile.mkdtemp(prefix=f"{method}{processes}-{engine}-", dir=work))
    out = record / "out"
    argv = train_argv(method, model, data, out, args.resolution, args.steps)
    argv[argv.index("--train_batch_size") + 1] = str(args.batch_size)
    argv += [*ENGINES[engine], "--mixed_precision", args.mixed_precision]
    argv += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch"]
    if engine == "fsdp":
        config = fsdp_config(record / "fsdp.yaml", processes, args.mixed_precision)
        launch += ["--config_file", str(config), "--main_process_port", str(_free_port())]
    else:
        launch += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
        launch += ["--multi_gpu"] if processes > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               SDTRAIN_CACHE_DIR=str(record / "cache"))
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [*launch, str(Path(__file__).resolve()), "--child", method, str(record), "--", *argv]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{method} with {processes} process(es), engine {engine} failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in range(processes)]
    seconds = []
    for rank in ranks:
        stamps = rank["stamps"][args.warmup - 1:] if args.warmup else [0.0, *rank["stamps"]]
        if len(stamps) < 2:
            raise SystemExit(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}")
        seconds.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    step_s = max(seconds)  # the processes wait for each other at every all-reduce: the slowest sets the pace
    return {"method": method, "processes": processes, "engine": engine, "steps_per_s": 1.0 / step_s,
            "images_per_s": args.batch_size * processes / step_s,
            "peak_rss_gib": [r["peak_rss"] / 2**30 for r in ranks],
            "peak_gpu_gib": [r["peak_gpu"] / 2**30 for r in ranks if r.get("peak_gpu") is not None]}


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run every (method, processes) pair, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # inside accelerate launch: --child METHOD RECORD -- <script argv>
        return child(argv[1], Path(argv[2]), argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--method", default="lora,ft", help="comma-separated: lora, ft (default both)")
    parser.add_argument("--preset", default="tiny-sd1", help="tools/make_tiny_model.py preset (default tiny-sd1)")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution (default 64)")
    parser.add_argument("--batch_size", type=int, default=1, help="batch per process (default 1)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU (default 1)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where the processes train")
    parser.add_argument("--engine", default="ddp", help=f"comma-separated: {', '.join(ENGINES)} (default ddp)")
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="no",
                        help="the scripts' --mixed_precision (default no)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="give the scripts "
                        "--gradient_checkpointing")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    args = parser.parse_args(argv)
    counts = [int(p) for p in args.processes.split(",")]
    methods = args.method.split(",")
    engines = args.engine.split(",")
    if bad := [m for m in methods if m not in METHODS]:
        parser.error(f"--method {','.join(bad)}: choose from {', '.join(METHODS)}")
    if bad := [e for e in engines if e not in ENGINES]:
        parser.error(f"--engine {','.join(bad)}: choose from {', '.join(ENGINES)}")
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup by at least 2")
    work = Path(tempfile.mkdtemp(prefix="sdtrain-scaling-"))
    model = model_file(args.preset, work)
    images = max(counts) * args.batch_size * 4
    data = make_images(work / "data", args.resolution, count=images)
    print(f"preset {args.preset}, resolution {args.resolution}, batch {args.batch_size} per process, {args.steps} "
          f"steps ({args.warmup} warm-up), {args.threads} thread(s) per process, device {args.device}, "
          f"{os.cpu_count()} CPU(s), mixed precision {args.mixed_precision}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"{'method':<28} {'engine':<14} {'procs':>5} {'steps/s':>8} {'images/s':>9} {'efficiency':>10}  "
          "peak RSS per process (GiB)  [peak GPU memory per process (GiB)]")
    for method in methods:
        for engine in engines:
            base = None
            for count in counts:
                r = run_one(method, count, args, model, data, work, engine)
                if count == 1:
                    base = r["images_per_s"]
                eff = f"{r['images_per_s'] / (count * base):.0%}" if base else "n/a"
                rss = ", ".join(f"{g:.2f}" for g in r["peak_rss_gib"])
                gpu = ", ".join(f"{g:.2f}" for g in r["peak_gpu_gib"])
                print(f"{METHODS[method]:<28} {engine:<14} {count:>5} {r['steps_per_s']:>8.2f} "
                      f"{r['images_per_s']:>9.2f} {eff:>10}  {rss}" + (f"  [{gpu}]" if gpu else ""), flush=True)
    if args.keep:
        print(f"work folder: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
