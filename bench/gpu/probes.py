"""What this machine offers the benchmark: CUDA, bf16, xformers, bitsandbytes, deepspeed, ``--torch_compile``, kohya.

Optional packages are tried in a child process with a tiny real call (an import alone can succeed and the
first kernel still fail, e.g. a wheel built for another CUDA), so a broken package cannot take the
driver down with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.gpu.install import versions

XFORMERS_PROBE = """
import torch, xformers, xformers.ops as xops
q = torch.randn(1, 64, 8, 40, device="cuda", dtype=torch.float16)
out = xops.memory_efficient_attention(q, q, q)
torch.cuda.synchronize()
print(xformers.__version__)
"""

BITSANDBYTES_PROBE = """
import torch, bitsandbytes as bnb
p = torch.nn.Parameter(torch.randn(8192, device="cuda"))
p.grad = torch.randn_like(p)
bnb.optim.AdamW8bit([p], lr=1e-3).step()
torch.cuda.synchronize()
print(bnb.__version__)
"""


DEVICE_PROBE = """
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else None,
                  "bf16": bool(torch.cuda.is_bf16_supported()) if cuda else True}))
"""


def _try_in_child(code: str, timeout: float = 120.0) -> str:
    """Run ``code`` in a fresh interpreter: "ok <its last output line>" or the last error line."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"the probe took over {timeout:.0f} s"
    if done.returncode == 0:
        return "ok " + (done.stdout.strip().splitlines() or [""])[-1]
    lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"the probe exited with code {done.returncode}"


def package_status(name: str, probe: str, *, cuda: bool, setup: dict[str, Any]) -> tuple[str, str | None]:
    """``("ok", version)`` when ``name`` imports and its probe runs on the GPU, else ``(why not, None)``.
    ``setup`` is run.sh's install report: its reason is given when the package was not installed."""
    if importlib.util.find_spec(name) is None:
        why = (setup.get("optional", {}).get(name) or {}).get("reason")
        return (why or f"package '{name}' is not installed"), None
    if not cuda:
        return "needs CUDA", None
    result = _try_in_child(probe)
    if result.startswith("ok"):
        return "ok", result[3:] or None
    return f"installed but its GPU test failed: {result}", None


def deepspeed_status(setup: dict[str, Any]) -> tuple[str, str | None]:
    """``("ok", version)`` when deepspeed imports in a child process (on the GPU and in the CPU smoke run:
    its ZeRO cases train on either), else ``(why not, None)``."""
    if importlib.util.find_spec("deepspeed") is None:
        why = (setup.get("optional", {}).get("deepspeed") or {}).get("reason")
        return (why or "package 'deepspeed' is not installed (make setup-deepspeed)"), None
    result = _try_in_child("import deepspeed\nprint(deepspeed.__version__)")
    return ("ok", result[3:] or None) if result.startswith("ok") else (f"installed but does not import: {result}", None)


def torch_compile_status() -> str:
    """"ok" when train_network.py has ``--torch_compile``, else why not."""
    import train_network

    flags = {s for action in train_network.build_parser()._actions for s in action.option_strings}
    return "ok" if "--torch_compile" in flags else "train_network.py has no --torch_compile option"


def kohya_status(kohya_dir: str | None) -> str:
    """Whether a kohya-ss/sd-scripts source tree is here for side-by-side runs."""
    if not kohya_dir:
        return "kohya not carried (no --kohya_dir / KOHYA_DIR): the LoRA-step ratio target is not checked"
    if not (Path(kohya_dir) / "train_network.py").is_file():
        return f"kohya not carried: {kohya_dir} holds no train_network.py"
    return (f"kohya source found at {kohya_dir}, but this bench does not run it side by side yet: "
            "the LoRA-step ratio target is not checked")


def read_setup(path: str | None) -> dict[str, Any]:
    """run.sh's install report (bench/gpu/wheels.py install --report), or {} when there is none."""
    if not path or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def probe_environment(*, cpu_smoke: bool, setup: dict[str, Any], kohya_dir: str | None) -> dict[str, Any]:
    """Everything :func:`cases.skip_reason` and the report need to know about this machine."""
    import torch

    device = {"cuda": False, "device": None, "bf16": True}
    if not cpu_smoke:  # asked in a child: the driver itself never holds a CUDA context (or its memory)
        answer = _try_in_child(DEVICE_PROBE)
        if answer.startswith("ok "):
            device = json.loads(answer[3:])
        else:
            device["device"] = f"CPU (the CUDA probe failed: {answer})"
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda": device["cuda"], "device": device["device"] or f"CPU ({os.cpu_count()} cores)", "bf16": device["bf16"],
        "torch_compile": torch_compile_status(), "kohya": kohya_status(kohya_dir),
    }
    cuda = device["cuda"]
    for name, probe in (("xformers", XFORMERS_PROBE), ("bitsandbytes", BITSANDBYTES_PROBE)):
        env[name], env[f"{name}_version"] = package_status(name, probe, cuda=cuda, setup=setup)
    env["deepspeed"], env["deepspeed_version"] = deepspeed_status(setup)
    env["packages"] = versions()
    return env
