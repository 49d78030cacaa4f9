"""bench/gpu: the case matrix, the plan, the command lines, the report, the carried wheels, the child.

The GPU itself is never needed: the matrix is planned and rendered on the CPU, the child runs the real
train_network.py on a tiny model, and the slow test runs the whole ``--cpu_smoke`` matrix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.gpu import cases, commands, install, report, wheels
from bench.gpu.gpu_bench import main as bench_main
from library.cli import run_main
from library.errors import UserError

REPO = Path(__file__).resolve().parent.parent
GPU_ENV = {"cuda": True, "bf16": True, "xformers": "ok", "bitsandbytes": "ok", "torch_compile": "ok",
           "deepspeed": "ok"}


# ---- cases ------------------------------------------------------------------------------------------

def test_select_cases_by_name_kind_pattern_and_all():
    assert cases.select_cases("all") == list(cases.MATRIX)
    lora = cases.select_cases("lora")
    assert [c.name for c in lora] == [c.name for c in cases.MATRIX if c.kind == "lora"] and len(lora) == 8
    assert cases.select_cases("lora-*") == lora
    picked = cases.select_cases("latents-256,ft-bf16,latents-256")  # matrix order, each once
    assert [c.name for c in picked] == ["ft-bf16", "latents-256"]
    assert [c.name for c in cases.select_cases("resume")] == ["resume", "resume-deterministic"]
    with pytest.raises(UserError, match=r"--cases nope: no such case"):
        cases.select_cases("lora-bf16,nope")


def test_skip_reasons_name_what_is_missing():
    by_name = {c.name: c for c in cases.MATRIX}
    assert all(cases.skip_reason(c, GPU_ENV, cpu_smoke=False) is None for c in cases.MATRIX)
    no_extras = dict(GPU_ENV, xformers="package 'xformers' is not installed", torch_compile="no such option")
    assert cases.skip_reason(by_name["lora-xformers"], no_extras, cpu_smoke=False) == \
        "xformers not available: package 'xformers' is not installed"
    assert cases.skip_reason(by_name["lora-compile"], no_extras, cpu_smoke=False) == \
        "option not available: no such option"
    assert cases.skip_reason(by_name["lora-adamw8bit"], no_extras, cpu_smoke=False) is None
    for name in ("lora-fp16", "lora-b1-gc", "lora-xformers", "lora-adamw8bit"):
        assert cases.skip_reason(by_name[name], GPU_ENV, cpu_smoke=True) == cases.CUDA_ONLY
    assert cases.skip_reason(by_name["lora-bf16"], GPU_ENV, cpu_smoke=True) is None
    cpu = dict(GPU_ENV, cuda=False)
    assert "needs CUDA" in cases.skip_reason(by_name["lora-fp16"], cpu, cpu_smoke=False)
    for name in ("ft-zero2-offload", "ft-zero3-offload-gc"):  # the ZeRO cases train on the CPU too
        assert cases.skip_reason(by_name[name], GPU_ENV, cpu_smoke=True) is None
        assert cases.skip_reason(by_name[name], dict(GPU_ENV, deepspeed="not carried"), cpu_smoke=False) == \
            "deepspeed not available: not carried"


def test_zero_cases_train_with_deepspeed_and_offload(tmp_path):
    from bench.gpu import commands

    by_name = {c.name: c for c in cases.MATRIX}
    ws = commands.Workspace(tmp_path, "tiny-sd1")
    (ws.data / "1_bench").mkdir(parents=True)  # fine_tune.py's metadata json is written beside it
    argv = commands.training_argv(by_name["ft-zero3-offload-gc"], cases.SMOKE, ws, tmp_path / "out", steps=2,
                                  unet_only=True)
    text = " ".join(map(str, argv))
    assert "--deepspeed --zero_stage 3 --offload_optimizer_device cpu --offload_param_device cpu" in text
    assert "--gradient_checkpointing" in argv
    assert "--deepspeed" not in commands.training_argv(by_name["ft-bf16"], cases.SMOKE, ws, tmp_path / "o",
                                                       steps=2, unet_only=True)
    assert wheels.deepspeed_spec().startswith("deepspeed==")


def test_sizes_full_smoke_and_override():
    assert (cases.FULL.preset, cases.FULL.resolution, cases.FULL.batch_size) == ("sd1", 512, 4)
    assert cases.SMOKE.preset == "tiny-sd1" and cases.SMOKE.steps <= 2
    short = cases.sizes_for(False, steps=3)
    assert short.steps == 3 and short.warmup == 1 and short.sample_every == 1
    with pytest.raises(UserError, match="--steps 0"):
        cases.sizes_for(True, steps=0)


# ---- command lines ----------------------------------------------------------------------------------

def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_every_case_command_line_parses_with_the_real_script(tmp_path):
    import fine_tune
    import train_network

    ws = commands.Workspace(tmp_path / "ws", "sd1")
    ws.data.mkdir(parents=True)
    parsers = {"train_network": train_network.build_parser(), "fine_tune": fine_tune.build_parser()}
    for case in cases.MATRIX:
        for run in commands.case_runs(case, cases.FULL, ws, tmp_path / "runs", unet_only=False):
            args = parsers[run.script].parse_args(run.argv)
            assert args.train_batch_size == (case.batch_size or 4) and args.resolution == "512"
            assert args.mixed_precision == case.mixed_precision and args.full_bf16 == case.full_bf16
            assert args.xformers == (case.attention == "xformers") and args.optimizer_type == case.optimizer
            assert args.gradient_checkpointing == case.gradient_checkpointing
            assert args.torch_compile == case.torch_compile
            if run.script == "train_network":
                assert (args.network_dim, args.network_alpha) == (16, 8) and not args.network_train_unet_only
            assert run.output_dir == Path(args.output_dir)


def test_special_case_command_lines(tmp_path):
    ws = commands.Workspace(tmp_path / "ws", "sd1")
    ws.data.mkdir(parents=True)
    by_name = {c.name: c for c in cases.MATRIX}
    [sampling] = commands.case_runs(by_name["sampling"], cases.FULL, ws, tmp_path, unet_only=False)
    assert _value(sampling.argv, "--sample_every_n_steps") == "6"
    assert _value(sampling.argv, "--sample_prompts") == str(ws.prompts)
    [latents] = commands.case_runs(by_name["latents-256"], cases.FULL, ws, tmp_path, unet_only=True)
    assert _value(latents.argv, "--train_data_dir") == str(ws.latent_data) and "--enable_bucket" in latents.argv
    assert _value(latents.argv, "--max_train_steps") == "1" and "--network_train_unet_only" in latents.argv
    straight, resumed = commands.case_runs(by_name["resume"], cases.FULL, ws, tmp_path, unet_only=False)
    assert _value(straight.argv, "--save_every_n_steps") == "4" and "--save_state" in straight.argv
    assert _value(resumed.argv, "--resume") == str(straight.output_dir / "bench-step00000004-state")
    assert _value(resumed.argv, "--max_train_steps") == _value(straight.argv, "--max_train_steps") == "8"
    assert straight.result_file.name == "bench.safetensors" and straight.output_dir != resumed.output_dir


def test_set_and_drop_flag():
    argv = ["--a", "1", "--switch", "--b", "2"]
    assert commands.set_flag(argv, "--a", 5) == ["--a", "5", "--switch", "--b", "2"]
    assert commands.set_flag(argv, "--c", 3)[-2:] == ["--c", "3"]
    assert commands.set_flag(argv, "--switch") == argv
    assert commands.drop_flag(argv, "--switch") == ["--a", "1", "--b", "2"]
    assert commands.drop_flag(argv, "--b") == ["--a", "1", "--switch"]


# ---- the driver's command line ----------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_builds_nothing(tmp_path, capsys):
    assert run_main(bench_main, ["--dry_run", "--cpu_smoke", "--work_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for case in cases.MATRIX:
        assert f"[{case.name}]" in out
    assert f"[lora-fp16] SKIP: {cases.CUDA_ONLY}" in out
    assert f"[lora-compile] SKIP: {cases.CUDA_ONLY}" in out
    assert "[lora-bf16] run\n  train: python train_network.py --pretrained_model_name_or_path" in out
    assert "fine_tune.py" in out and "--resume" in out
    assert not (tmp_path / "tiny-sd1-64px" / "model").exists()
    assert not list(tmp_path.rglob("*.png"))


def test_bad_case_name_is_one_line_exit_2(tmp_path, capsys):
    assert run_main(bench_main, ["--dry_run", "--cases", "lora-nope", "--work_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --cases lora-nope: no such case")


def test_full_size_run_without_cuda_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full-size run would start")
    assert run_main(bench_main, ["--cases", "lora-bf16", "--work_dir", str(tmp_path)]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err and not list(tmp_path.rglob("*.safetensors"))


# ---- figures and the report -------------------------------------------------------------------------

def _raw(times, losses, peaks, rounds=()):
    return {"step_seconds": times, "losses": losses, "step_peak_allocated": peaks,
            "step_peak_reserved": [p + 2**30 for p in peaks], "sampling_rounds": list(rounds), "peak_rss": 2**31}


def _results() -> dict:
    """A results json as gpu_bench.py writes it, with figures made from chosen raw measurements."""
    gib = 2**30
    by_name = {c.name: c for c in cases.MATRIX}
    kw = dict(batch_size=4, warmup=2, flops_per_image=2.41e12, peak_tflops=989.0)
    entries = []

    def add(name, raws, status="ok", reason=None, diff=None):
        settings = by_name[name].settings()
        metrics = report.case_metrics(settings, raws, max_abs_diff=diff, **kw) if status == "ok" else None
        entries.append({"name": name, "kind": settings["kind"], "settings": settings, "status": status,
                        "reason": reason, "runs": [], "metrics": metrics})

    add("lora-bf16", {"train": _raw([9.0, 3.0, 0.2, 0.25, 0.2, 0.3], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5], [8 * gib] * 6)})
    add("lora-xformers", {}, status="skipped", reason="xformers not available: not carried")
    add("lora-b1-gc", {"train": _raw([1.0, 1.0, 0.1, 0.1], [1.0, float("nan"), 1.0, 1.0], [3 * gib] * 4)})
    add("ft-bf16", {"train": _raw([5.0, 1.0, 0.4, 0.4, 0.4], [1.0, 1.1, 1.2, 1.3, 1.4], [20 * gib] * 5)})
    flat = [{"seconds": 2.0, "peak_allocated": p, "peak_reserved": p} for p in (9 * gib, 9 * gib + 2**20)]
    add("sampling", {"train": _raw([1.0, 1.0, 0.2, 0.2], [1.0, 0.9, 0.8, 0.7], [8 * gib] * 4, flat)})
    add("latents-256", {"train": {"latents": {"encoded": 256, "total_seconds": 8.0, "vae_seconds": 6.0,
                                              "wait_seconds": 1.0, "batch_size": 4, "workers": 8}}})
    add("resume", {"straight": _raw([1.0] * 3, [1.0, 0.9, 0.8], [gib] * 3), "resumed": {}}, diff=0.0)
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "python": "3.12.3",
           "xformers": "ok", "bitsandbytes": "ok", "torch_compile": "no option", "kohya": "kohya not carried"}
    return {"meta": {"cpu_smoke": False, "sizes": dataclasses.asdict(cases.FULL), "env": env,
                     "flops_per_image": 2.41e12, "peak_tflops": 989.0}, "cases": entries}


def test_figures_from_raw_measurements():
    results = _results()
    m = {e["name"]: e["metrics"] for e in results["cases"]}
    lora = m["lora-bf16"]  # warm-up steps 9.0 and 3.0 are left out
    assert lora["s_per_step"] == pytest.approx(0.225) and lora["img_per_s"] == pytest.approx(4 / 0.225)
    assert lora["peak_vram_gib"] == 8.0 and lora["peak_reserved_gib"] == 9.0
    assert lora["loss"]["finite"] and lora["loss"]["decreasing"] is True
    assert m["lora-b1-gc"]["img_per_s"] == pytest.approx(1 / 0.1)  # batch 1 from the case
    assert m["lora-b1-gc"]["loss"]["finite"] is False
    assert m["ft-bf16"]["mfu"] == pytest.approx(10.0 * 2.41e12 / 989e12)
    assert m["ft-bf16"]["loss"]["decreasing"] is False
    assert m["sampling"]["sampling"]["flat"] is True and m["sampling"]["sampling"]["rounds"] == 2
    assert m["latents-256"]["img_per_s"] == pytest.approx(32.0)
    assert m["resume"]["exact"] is True
    grown = [{"seconds": 1.0, "peak_allocated": p, "peak_reserved": p} for p in (8 * 2**30, 9 * 2**30)]
    assert report.sampling_figures({"sampling_rounds": grown})["flat"] is False


def test_markdown_report_and_render_option(tmp_path, capsys):
    results = _results()
    text = report.render_markdown(results)
    assert "| lora-bf16 | bf16 | sdpa | AdamW | no | no | 4 | 0.225 | 17.78 | 8.00 / 9.00 | finite, decreasing" in text
    assert "| lora-xformers |" in text and "skipped: xformers not available: not carried" in text
    assert "| ft-bf16 |" in text and "| 2.4 % |" in text
    assert "LoRA 512 px batch 1 with gradient checkpointing <= 6 GiB: peak reserved 4.00 GiB" in text
    assert "(met)" in text and "MFU >= 35 %: 2.4 % (NOT met" in text
    assert "32.0 img/s" in text and "bit-identical" in text and "kohya not carried" in text
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    md = tmp_path / "report.md"
    assert run_main(bench_main, ["--render", str(path), "--report", str(md)]) == 0
    assert md.read_text(encoding="utf-8") == text
    path.write_text("{}", encoding="utf-8")
    assert run_main(bench_main, ["--render", str(path)]) == 2
    assert "not a gpu_bench.py results json" in capsys.readouterr().err


# ---- carried wheels ---------------------------------------------------------------------------------

def test_requirement_closure_skips_torch_cuda_wheels_and_markers():
    meta = {"diffusers": ("0.42", ["numpy", "huggingface-hub>=1", "torch>=2"]),
            "huggingface-hub": ("1.3", ["tomli; python_version < '3.0'", "hf-xet", "numpy"]),
            "hf-xet": ("1.0", []), "numpy": ("2.0", []), "torch": ("2.9", ["nvidia-cublas"]),
            "accelerate": ("1.0", ["torch", "nvidia-nccl-cu13", "psutil"])}
    closure = wheels.requirement_closure(["diffusers>=0.30", "accelerate", "not-installed"],
                                         lambda n: meta.get(n, (None,))[0], lambda n: meta[n][1])
    assert closure == {"diffusers": "0.42", "huggingface-hub": "1.3", "hf-xet": "1.0", "numpy": "2.0",
                       "accelerate": "1.0"}
    carried = wheels.carried_set(dict(closure, toml="0.10"), device_has={"numpy", "accelerate", "hf-xet"})
    assert carried == {"accelerate": "1.0", "diffusers": "0.42", "huggingface-hub": "1.3", "toml": "0.10"}


def _fake_wheel(path: Path, name: str, version: str, files: dict[str, bytes], requires: list[str]) -> Path:
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires) + "\nlong description: Name: ignored\n"
    files = {**files, f"{info}/METADATA": meta.encode(), f"{info}/WHEEL": b"Wheel-Version: 1.0\n"}
    record = "".join(f"{n},sha256=x,{len(d)}\n" for n, d in files.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{info}/RECORD", record)
    return path


def test_slim_bitsandbytes_keeps_the_chosen_cuda_builds(tmp_path):
    libs = {f"bitsandbytes/libbitsandbytes_{t}.so": t.encode() * 100 for t in
            ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025")}
    wheel = _fake_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "bitsandbytes",
                        "0.50.2", {**libs, "bitsandbytes/__init__.py": b"x = 1\n"}, ["torch<3,>=2.4", "numpy"])
    assert wheels.bnb_cuda_builds(wheel) == ["118", "128", "130", "132"]
    wheels.slim_bitsandbytes(wheel, ["130"])
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"}
    assert {n for n in names if n.endswith(".so")} == kept and "bitsandbytes/__init__.py" in names
    assert {line.split(",")[0] for line in record.splitlines() if ".so," in line} == kept
    entry = wheels.describe(wheel)
    assert entry["cuda_libs"] == ["130"] and entry["torch"] == "<3,>=2.4" and entry["name"] == "bitsandbytes"


def test_xformers_wheel_description_and_fit(tmp_path):
    so = b"\x7fELF junk libc10.so\x00libcudart.so.12\x00more"
    wheel = _fake_wheel(tmp_path / "xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl", "xformers", "0.0.35",
                        {"xformers/_C.so": so}, ["torch>=2.10", "numpy"])
    entry = wheels.describe(wheel)
    assert (entry["torch"], entry["cudart_major"], entry["version"]) == (">=2.10", 12, "0.0.35")
    assert install.xformers_fit(entry, "2.10.1+cu128", "12.8") is None
    assert "built for CUDA 12" in install.xformers_fit(entry, "2.11.0+cu130", "13.0")
    assert "needs torch>=2.10" in install.xformers_fit(entry, "2.9.0+cu128", "12.8")
    assert "no CUDA" in install.xformers_fit(entry, "2.11.0+cpu", None)
    bnb = {"version": "0.50.2", "cuda_libs": ["130", "132"]}
    assert install.bitsandbytes_fit(bnb, "13.0") is None
    assert "--bnb-cuda 128" in install.bitsandbytes_fit(bnb, "12.8")


def test_install_helpers():
    assert all(not r.lower().startswith("torch") for r in install.core_requirements())
    assert any(r.startswith("diffusers") for r in install.core_requirements())
    out = "ERROR: Could not find a version\nERROR: No matching distribution found for requests>=2\n"
    assert install.missing_from_pip(out) == ["requests>=2"]
    assert wheels.platform_tags(24)[:3] == ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_18_x86_64"]
    assert wheels.never_carried("nvidia-cudnn-cu13") and wheels.never_carried("torch")
    assert not wheels.never_carried("diffusers")


# ---- the child, in this process ---------------------------------------------------------------------

def test_child_records_steps_losses_and_sampling_rounds(tmp_path):
    from bench.gpu import child
    from bench.train_step import make_images
    from library.training import tracking, trainer
    from tests.models_util import make_model_files

    model = make_model_files(tmp_path / "m", "tiny-sd1", formats="safetensors")["safetensors"]
    data = make_images(tmp_path / "data", 64, count=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bench --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
            "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", "2", "--train_batch_size", "1", "--cache_latents", "--seed", "0",
            "--max_data_loader_n_workers", "0", "--sample_every_n_steps", "1", "--sample_prompts", str(prompts)]
    originals = trainer.Trainer.run, tracking.Tracker.step
    result = child.run_spec({"script": "train_network", "argv": argv})
    assert (trainer.Trainer.run, tracking.Tracker.step) == originals  # the wrappers are removed again
    assert result["exit_code"] == 0 and result["error"] is None
    assert len(result["step_seconds"]) == 2 and all(s > 0 for s in result["step_seconds"])
    assert len(result["losses"]) == 2 and all(0 < v < 10 for v in result["losses"])
    assert len(result["sampling_rounds"]) == 2 and all(r["seconds"] > 0 for r in result["sampling_rounds"])
    assert result["latents"]["encoded"] == 2 and result["device"] == "cpu"
    assert (tmp_path / "out" / "last.safetensors").is_file()
    refused = child.run_spec({"script": "train_network", "argv": argv + ["--max_train_steps", "0"]})
    assert refused["exit_code"] == 2 and refused["step_seconds"] == []


# ---- the whole smoke matrix -------------------------------------------------------------------------

@pytest.mark.slow
def test_cpu_smoke_runs_the_whole_matrix(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "gpu_bench.py"), "--cpu_smoke", "--steps",
                           "1", "--work_dir", str(tmp_path / "work"), "--out_dir", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu_bench.json").read_text(encoding="utf-8"))
    status = {e["name"]: e for e in results["cases"]}
    assert list(status) == [c.name for c in cases.MATRIX]
    for name in ("lora-fp16", "lora-b1-gc", "lora-xformers", "lora-adamw8bit"):
        assert status[name]["status"] == "skipped" and status[name]["reason"] == cases.CUDA_ONLY
    assert status["lora-compile"]["reason"] == cases.CUDA_ONLY
    if importlib.util.find_spec("deepspeed") is not None:  # the ZeRO cases train on the CPU as well
        assert status["ft-zero2-offload"]["status"] == status["ft-zero3-offload-gc"]["status"] == "ok"
    ran = [e for e in results["cases"] if e["status"] != "skipped"]
    assert ran and all(e["status"] == "ok" for e in ran), [(e["name"], e["reason"]) for e in ran]
    for e in ran:
        if e["kind"] in ("lora", "ft", "sampling"):
            assert e["metrics"]["s_per_step"] > 0 and e["metrics"]["loss"]["finite"]
    assert status["sampling"]["metrics"]["sampling"]["rounds"] == 1
    assert status["latents-256"]["metrics"]["images"] == cases.SMOKE.latent_images
    assert status["resume"]["metrics"]["max_abs_diff"] == 0.0
    assert status["resume-deterministic"]["metrics"]["max_abs_diff"] == 0.0
    md = (out / "gpu_bench.md").read_text(encoding="utf-8")
    assert "# GPU benchmark (CPU smoke run)" in md and "## LoRA" in md and "## Exact resume" in md
    assert (out / "cases.log").stat().st_size > 0
