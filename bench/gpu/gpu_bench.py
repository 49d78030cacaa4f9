"""GPU benchmark driver: the LoRA / fine-tuning matrix, sampling, latent caching and exact resume.

    python bench/gpu/gpu_bench.py [--cases all] [--steps N] [--out_dir DIR] [--dry_run] [--cpu_smoke]
                                  [--deterministic] [--budget_s 390] [--render RESULTS.json]

Every case runs the real entry script (train_network.py, fine_tune.py) in a fresh process
(bench/gpu/child.py), on the full-size SD1.5 architecture with random weights, 512 px, batch 4. Results go
to ``<out_dir>/gpu_bench.json`` (after every case) and ``<out_dir>/gpu_bench.md``; the children's log
tails to ``<out_dir>/cases.log``. ``--cpu_smoke`` runs the same matrix on the CPU with the tiny model
and 1-2 steps, skipping CUDA-only cases with the reason. See docs/gpu_bench.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu import report  # noqa: E402
from bench.gpu.cases import MATRIX, Case, Sizes, select_cases, sizes_for, skip_reason  # noqa: E402
from bench.gpu.commands import Run, Workspace, case_runs, populate  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

CHILD = Path(__file__).resolve().parent / "child.py"
FLOPS_PER_IMAGE = 2.41e12   # SD1.5 UNet at 512 px, forward + backward, per image
H100_SXM_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
LOG_TAIL_LINES = 40
FULL_RUN_S, SMOKE_RUN_S = 40.0, 10.0  # a case starts only with this much budget left per run


def build_parser() -> argparse.ArgumentParser:
    """The driver's options."""
    p = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--cases", default="all", help="comma-separated case names, kinds (lora, ft, sampling, latents, "
                   f"resume), patterns (lora-*) or all (default); cases: {', '.join(c.name for c in MATRIX)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per timed case (default 24; smoke 2)")
    p.add_argument("--out_dir", default=None, help="results folder (default $OUT, else <work_dir>/results)")
    p.add_argument("--output", default=None, help="results json (default <out_dir>/gpu_bench.json)")
    p.add_argument("--report", default=None, help="Markdown report (default <out_dir>/gpu_bench.md)")
    p.add_argument("--work_dir", default="/tmp/sdtrain_gpu_bench", help="model, images and run outputs")
    p.add_argument("--dry_run", action="store_true", help="print the plan (cases, skips, command lines) and exit")
    p.add_argument("--cpu_smoke", action="store_true", help="the whole matrix on the CPU with the tiny model")
    p.add_argument("--deterministic", action="store_true", help="deterministic torch kernels in every case")
    p.add_argument("--lora_unet_only", action="store_true",
                   help="LoRA on the UNet only (default: UNet and text encoder, as kohya trains by default)")
    p.add_argument("--budget_s", type=float, default=390.0, help="stop starting cases after this many seconds "
                   "(default 390, so that run.sh stays under 8 minutes)")
    p.add_argument("--case_timeout_s", type=float, default=180.0, help="kill one run after this many seconds")
    p.add_argument("--flops_per_image", type=float, default=FLOPS_PER_IMAGE,
                   help="FLOP per image forward + backward for MFU (default 2.41e12: SD1.5 UNet, 512 px)")
    p.add_argument("--peak_tflops", type=float, default=H100_SXM_BF16_TFLOPS,
                   help="the GPU's dense bf16 peak for MFU (default 989: H100 SXM)")
    p.add_argument("--setup_json", default=None, help="run.sh's install report (bench/gpu/wheels.py install)")
    p.add_argument("--kohya_dir", default=os.environ.get("KOHYA_DIR"),
                   help="a kohya-ss/sd-scripts checkout for side-by-side runs (default $KOHYA_DIR)")
    p.add_argument("--render", default=None, metavar="RESULTS_JSON",
                   help="only write the Markdown report of an existing results json")
    return p


@dataclasses.dataclass
class Planned:
    """A case with its runs, or the reason it is skipped."""

    case: Case
    runs: list[Run]
    reason: str | None


def make_plan(cases: list[Case], sizes: Sizes, env: dict[str, Any], ws: Workspace, out_root: Path,
              args: argparse.Namespace) -> list[Planned]:
    """Each selected case with its command lines and skip reason."""
    plan = []
    ws.data.mkdir(parents=True, exist_ok=True)  # train_argv("ft") writes meta.json there (rewritten by populate)
    for case in cases:
        if args.deterministic and not case.deterministic:
            case = dataclasses.replace(case, deterministic=True)
        runs = case_runs(case, sizes, ws, out_root, unet_only=args.lora_unet_only)
        plan.append(Planned(case, runs, skip_reason(case, env, cpu_smoke=args.cpu_smoke)))
    return plan


def print_plan(plan: list[Planned], sizes: Sizes, env: dict[str, Any]) -> None:
    """The --dry_run output: what would run, with the exact command lines, and what is skipped and why."""
    print(f"device: {env['device']}; torch {env['torch']} (CUDA {env['torch_cuda']})")
    print(f"sizes: {json.dumps(dataclasses.asdict(sizes))}")
    for item in plan:
        print(f"[{item.case.name}] {'SKIP: ' + item.reason if item.reason else 'run'}")
        if item.reason:
            continue
        for run in item.runs:
            flags = " (deterministic)" if item.case.deterministic else ""
            print(f"  {run.label}{flags}: python {run.script}.py {shlex.join(run.argv)}")


def child_env(cpu_smoke: bool) -> dict[str, str]:
    """The children's environment: offline, no progress bars, CPU only for the smoke run."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONUNBUFFERED="1")
    if cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(run: Run, case: Case, work: Path, log: Path, *, timeout: float, env: dict[str, str]
              ) -> tuple[dict[str, Any] | None, str | None]:
    """One run in a fresh process: its raw result, or None and why it failed."""
    spec = work / "specs" / f"{case.name}-{run.label}.json"
    result = spec.with_suffix(".result.json")
    spec.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"script": run.script, "argv": run.argv, "deterministic": case.deterministic}),
                    encoding="utf-8")
    with open(log, "w", encoding="utf-8") as out:
        try:
            subprocess.run([sys.executable, str(CHILD), str(spec), str(result)], cwd=REPO, env=env, stdout=out,
                           stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s"
    if not result.is_file():
        return None, "the run wrote no result: " + " / ".join(tail(log, 3))
    raw = json.loads(result.read_text(encoding="utf-8"))
    if raw.get("exit_code") != 0:
        errors = [line for line in tail(log, 30) if line.startswith("error:")]
        return raw, raw.get("error") or (errors[-1] if errors else f"exit code {raw.get('exit_code')}")
    return raw, None


def tail(path: Path, n: int) -> list[str]:
    """The last ``n`` non-empty lines of a text file."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-n:]


def max_abs_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two safetensors files' tensors (inf if their keys differ)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def skipped(case: Case, reason: str) -> dict[str, Any]:
    """The results entry of a case that does not run."""
    return {"name": case.name, "kind": case.kind, "settings": case.settings(), "status": "skipped", "reason": reason,
            "runs": [], "metrics": None}


def run_case(item: Planned, sizes: Sizes, args: argparse.Namespace, work: Path, out_dir: Path,
             remaining: float) -> dict[str, Any]:
    """Run one planned case; its results entry."""
    case = item.case
    entry: dict[str, Any] = {"name": case.name, "kind": case.kind, "settings": case.settings(),
                             "batch_size": case.batch_size or sizes.batch_size, "status": "ok", "reason": None,
                             "runs": [], "metrics": None}
    raws: dict[str, dict[str, Any]] = {}
    env = child_env(args.cpu_smoke)
    start = time.perf_counter()
    for run in item.runs:  # the bench's own folders: a rerun starts clean (no stale states or outputs)
        shutil.rmtree(run.output_dir, ignore_errors=True)
    for run in item.runs:
        timeout = max(1.0, min(args.case_timeout_s, remaining - (time.perf_counter() - start)))
        log = work / "logs" / f"{case.name}-{run.label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        raw, error = run_child(run, case, work, log, timeout=timeout, env=env)
        entry["runs"].append({"label": run.label, "script": run.script, "argv": run.argv,
                              "seconds": time.perf_counter() - began, "error": error})
        with open(out_dir / "cases.log", "a", encoding="utf-8") as combined:
            combined.write(f"===== {case.name} / {run.label}: {error or 'ok'}\n")
            combined.write("\n".join(tail(log, LOG_TAIL_LINES)) + "\n")
        if error:
            entry.update(status="failed", reason=f"{run.label}: {error}")
            return entry
        raws[run.label] = raw or {}
    diff = None
    if case.kind == "resume":
        straight, resumed = item.runs
        diff = max_abs_diff(straight.result_file, resumed.result_file)
    entry["metrics"] = report.case_metrics(entry["settings"], raws, batch_size=sizes.batch_size, warmup=sizes.warmup,
                                           flops_per_image=args.flops_per_image,
                                           peak_tflops=None if args.cpu_smoke else args.peak_tflops,
                                           max_abs_diff=diff)
    return entry


def write_outputs(results: dict[str, Any], json_path: Path, md_path: Path | None) -> None:
    """The results json, and the Markdown report when ``md_path`` is given."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, json_path)
    if md_path is not None:
        md_path.write_text(report.render_markdown(results), encoding="utf-8")


def render_only(args: argparse.Namespace) -> int:
    """--render: the Markdown report of an existing results json (to --report, or printed)."""
    path = Path(args.render)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        text = report.render_markdown(results)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--render {path}: not a gpu_bench.py results json ({type(exc).__name__}: {exc})") from None
    if args.report:
        Path(args.report).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Plan, (build the model,) run every case within the budget, write the results."""
    from bench.gpu.probes import probe_environment, read_setup

    args = build_parser().parse_args(argv)
    if args.render:
        return render_only(args)
    clock = time.perf_counter()
    sizes = sizes_for(args.cpu_smoke, args.steps)
    cases = select_cases(args.cases)
    setup = read_setup(args.setup_json)
    env = probe_environment(cpu_smoke=args.cpu_smoke, setup=setup, kohya_dir=args.kohya_dir)
    work = Path(args.work_dir)
    ws = Workspace(work / f"{sizes.preset}-{sizes.resolution}px", sizes.preset)
    plan = make_plan(cases, sizes, env, ws, ws.root / "runs", args)
    if args.dry_run:
        print_plan(plan, sizes, env)
        return 0
    if not env["cuda"] and not args.cpu_smoke:
        raise UserError(f"no CUDA GPU here ({env['device']}): the full-size run needs one; use --cpu_smoke for the "
                        "CPU run with the tiny model, or --dry_run for the plan")
    out_dir = Path(args.out_dir or os.environ.get("OUT") or work / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.output) if args.output else out_dir / "gpu_bench.json"
    md_path = Path(args.report) if args.report else out_dir / "gpu_bench.md"
    (out_dir / "cases.log").write_text("", encoding="utf-8")
    results: dict[str, Any] = {"meta": {
        "cpu_smoke": args.cpu_smoke, "sizes": dataclasses.asdict(sizes), "env": env, "setup": setup,
        "flops_per_image": args.flops_per_image, "peak_tflops": args.peak_tflops, "budget_s": args.budget_s,
        "argv": sys.argv[1:] if argv is None else list(argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "cases": []}
    started = time.perf_counter()
    populate(ws, sizes, latents=any(p.case.kind == "latents" and not p.reason for p in plan))
    results["meta"]["prepare_seconds"] = time.perf_counter() - started
    print(f"inputs ready in {results['meta']['prepare_seconds']:.1f} s ({ws.model})", flush=True)
    for item in plan:
        remaining = args.budget_s - (time.perf_counter() - clock)
        if item.reason:
            entry = skipped(item.case, item.reason)
        elif remaining < len(item.runs) * (SMOKE_RUN_S if args.cpu_smoke else FULL_RUN_S):
            entry = skipped(item.case, f"time budget (--budget_s {args.budget_s:.0f}): {max(0.0, remaining):.0f} s left")
        else:
            entry = run_case(item, sizes, args, work, out_dir, remaining)
        results["cases"].append(entry)
        results["meta"]["elapsed_s"] = time.perf_counter() - clock
        write_outputs(results, json_path, None)
        print(f"[{entry['name']}] {entry['status']}{': ' + entry['reason'] if entry['reason'] else ''}", flush=True)
    write_outputs(results, json_path, md_path)
    print(md_path.read_text(encoding="utf-8"))
    print(f"results: {json_path}; report: {md_path}")
    return 1 if any(e["status"] == "failed" for e in results["cases"]) else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
