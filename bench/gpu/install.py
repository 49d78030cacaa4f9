"""Install the carried wheels on the GPU machine, never touching its torch; write what happened as json.

    python3 bench/gpu/install.py [--wheels bench/gpu/wheels] [--report setup.json]

1. The machine's torch first: ``torch.__version__`` and ``torch.version.cuda``; it is pinned with a
   constraint so no install can replace it.
2. The project's requirements without torch: ``pip install --no-index --find-links <wheels>``. pip keeps
   what the machine already has where it satisfies them and takes the rest from the carried wheels.
3. xformers and bitsandbytes, ``--no-deps``, only when the carried wheel fits this torch: xformers' torch
   range and CUDA runtime major, bitsandbytes' CUDA build (``libbitsandbytes_cuda130.so`` for CUDA
   13.0). Otherwise the report says "not available" and why; the benchmark skips their cases.
4. deepspeed where it was carried, with the carried packages it needs (torch pinned); its ops are
   JIT-compiled on first use.

Exit code 0 when the core install worked (optional packages may be missing), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REPORTED = ("diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "tokenizers", "toml",
            "voluptuous", "xformers", "bitsandbytes", "deepspeed")


def torch_info() -> dict[str, Any]:
    """The installed torch: version, CUDA version, whether a GPU is visible."""
    import torch

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}


def _release(version: str) -> str:
    """``2.11.0+cu130`` -> ``2.11.0`` (specifiers ignore local labels only sometimes)."""
    return version.split("+")[0]


def xformers_fit(entry: dict[str, Any], torch_version: str, torch_cuda: str | None) -> str | None:
    """Why the carried xformers wheel cannot serve this torch, or None when it can."""
    from packaging.specifiers import SpecifierSet

    spec = entry.get("torch") or ""
    if spec and _release(torch_version) not in SpecifierSet(spec):
        return f"carried xformers {entry['version']} needs torch{spec}; this machine has torch {torch_version}"
    major = entry.get("cudart_major")
    if torch_cuda is None:
        return f"this torch ({torch_version}) has no CUDA"
    if major is not None and int(torch_cuda.split(".")[0]) != major:
        return (f"carried xformers {entry['version']} is built for CUDA {major} (libcudart.so.{major}); this torch "
                f"is {torch_version} with CUDA {torch_cuda}: carry a matching build (prepare.sh --xformers-spec)")
    return None


def bitsandbytes_fit(entry: dict[str, Any], torch_cuda: str | None) -> str | None:
    """Why the carried bitsandbytes wheel has no library for this torch's CUDA, or None when it has."""
    if torch_cuda is None:
        return "this torch has no CUDA"
    tag = "".join(torch_cuda.split(".")[:2])
    builds = entry.get("cuda_libs") or []
    if tag not in builds:
        return (f"carried bitsandbytes {entry['version']} has CUDA builds {', '.join(builds) or 'none'}, "
                f"not {tag} (CUDA {torch_cuda}): rerun prepare.sh with --bnb-cuda {tag}")
    return None


def missing_from_pip(output: str) -> list[str]:
    """Requirements pip found no wheel for (``No matching distribution found for X``)."""
    return sorted(set(re.findall(r"No matching distribution found for ([^\s]+)", output)))


def pip_install(args: list[str], wheels: Path) -> tuple[bool, str]:
    """``pip install --no-index --find-links <wheels> ...``; (success, combined output)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
           "--disable-pip-version-check", "--no-warn-script-location", "--root-user-action=ignore", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.returncode == 0, done.stdout + done.stderr


def core_requirements() -> list[str]:
    """The project's requirements.txt without torch."""
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    reqs = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [r for r in reqs if re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() != "torch"]


def install_core(wheels: Path, torch_version: str) -> dict[str, Any]:
    """The project's requirements (torch pinned where it is)."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs, pins = Path(tmp) / "requirements.txt", Path(tmp) / "constraints.txt"
        reqs.write_text("\n".join(core_requirements()) + "\n", encoding="utf-8")
        pins.write_text(f"torch=={torch_version}\n", encoding="utf-8")
        ok, output = pip_install(["--only-binary=:all:", "-r", str(reqs), "-c", str(pins)], wheels)
    result: dict[str, Any] = {"ok": ok, "installed": re.findall(r"Successfully installed (.+)", output)}
    if not ok:
        missing = missing_from_pip(output)
        result["reason"] = (f"not on this machine and not carried: {', '.join(missing)} (bench/gpu/prepare.sh "
                            "--extra NAME==VERSION)") if missing else output.strip().splitlines()[-1][:400]
    return result


def install_optional(name: str, entry: dict[str, Any] | None, why_not: str | None, wheels: Path,
                     torch_version: str | None = None) -> dict[str, Any]:
    """One optional wheel when it fits, ``--no-deps``, or with ``torch_version`` its dependencies from the
    carried wheels and torch pinned; else the reason it is not available."""
    if entry is None:
        return {"ok": False, "reason": f"not carried (bench/gpu/prepare.sh without --no-{name})"}
    if why_not:
        return {"ok": False, "reason": why_not}
    if torch_version is None:
        ok, output = pip_install(["--no-deps", str(wheels / entry["file"])], wheels)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pins = Path(tmp) / "constraints.txt"
            pins.write_text(f"torch=={torch_version}\n", encoding="utf-8")
            ok, output = pip_install(["-c", str(pins), str(wheels / entry["file"])], wheels)
    return {"ok": ok, "reason": None if ok else output.strip().splitlines()[-1][:400]}


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the benchmark reports."""
    out = {}
    for name in REPORTED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    """Install and report."""
    p = argparse.ArgumentParser(prog="install.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--wheels", default=str(HERE / "wheels"), help="the carried wheels (with manifest.json)")
    p.add_argument("--report", default=None, help="write the install report json here")
    args = p.parse_args(argv)
    wheels = Path(args.wheels)
    report: dict[str, Any] = {"python": platform.python_version(), **torch_info()}
    manifest_path = wheels / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {"wheels": []}
    report["carried_python"] = manifest.get("python_version")
    if manifest.get("python_version") and not report["python"].startswith(manifest["python_version"] + "."):
        report["warning"] = (f"wheels were prepared for Python {manifest['python_version']}, this is {report['python']}"
                             ": rerun prepare.sh --python-version if an install fails")
    by_name = {e["name"]: e for e in manifest["wheels"]}
    report["core"] = install_core(wheels, report["torch"])
    xf, bnb = by_name.get("xformers"), by_name.get("bitsandbytes")
    report["optional"] = {
        "xformers": install_optional("xformers", xf, xf and xformers_fit(xf, report["torch"], report["torch_cuda"]),
                                     wheels),
        "bitsandbytes": install_optional("bitsandbytes", bnb, bnb and bitsandbytes_fit(bnb, report["torch_cuda"]),
                                         wheels),
        "deepspeed": install_optional("deepspeed", by_name.get("deepspeed"), None, wheels, report["torch"])}
    report["versions"] = versions()
    text = json.dumps(report, indent=1)
    if args.report:
        Path(args.report).write_text(text, encoding="utf-8")
    print(text)
    return 0 if report["core"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
