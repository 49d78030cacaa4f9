"""Wheels carried to the GPU machine, which has a CUDA torch but cannot reach a package index.

    python bench/gpu/wheels.py [--dest bench/gpu/wheels] [--python-version 3.12] [--bnb-cuda 130,132]
                               [--no-xformers] [--no-bitsandbytes] [--no-deepspeed] [--extra NAME==VERSION ...]

(bench/gpu/prepare.sh runs it with the project's virtualenv.) It downloads, ``--no-deps`` and for
manylinux x86_64 / CPython ``--python-version``:

- the core set (diffusers, transformers, accelerate, safetensors, huggingface_hub, tokenizers, toml,
  voluptuous, zipp) and every package of the project's requirement closure that the machine's image lacks
  (bench/gpu/device_packages.txt), each at the version installed here (the tested set); never torch,
  triton or the nvidia-* CUDA wheels;
- xformers and bitsandbytes (newest on the index), bitsandbytes slimmed to the CUDA builds in
  ``--bnb-cuda`` (its wheel holds one 4-26 MB library per CUDA version);
- deepspeed at the version of requirements-deepspeed.txt (``--deepspeed``, docs/distributed.md), needs
  ``make setup-deepspeed`` here: it is an sdist, so it is built here into a pure-Python wheel without its
  ops (DS_BUILD_OPS=0; the device JIT-compiles them), plus the packages it needs that the machine lacks;

and writes ``manifest.json`` (what each wheel needs: torch range, CUDA runtime) for bench/gpu/install.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CORE = ("diffusers", "transformers", "accelerate", "safetensors", "huggingface-hub", "tokenizers", "toml",
        "voluptuous", "zipp")  # zipp: 10 KB, and importlib_metadata (diffusers) needs a recent one
NEVER = ("torch", "triton", "torchvision", "torchaudio")
NEVER_PREFIXES = ("nvidia-", "cuda-")
DEFAULT_BNB_CUDA = "130,132"
SIZE_BUDGET = 60 * 2**20
BNB_LIB = re.compile(r"^bitsandbytes/libbitsandbytes_(cpu|cuda\d+|rocm\d+|xpu\d+)\.so$")


def never_carried(name: str) -> bool:
    """torch and its CUDA runtime wheels stay as the machine has them."""
    name = canonicalize_name(name)
    return name in NEVER or name.startswith(NEVER_PREFIXES)


def requirement_closure(roots: Iterable[str], version_of: Callable[[str], str | None],
                        requires_of: Callable[[str], list[str]]) -> dict[str, str]:
    """Every distribution the ``roots`` requirements pull in (markers evaluated here, no extras), by
    canonical name -> installed version; torch and CUDA wheels left out, as are names not installed."""
    found: dict[str, str] = {}
    pending = [Requirement(r) for r in roots]
    while pending:
        req = pending.pop()
        name = canonicalize_name(req.name)
        if name in found or never_carried(name) or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        version = version_of(name)
        if version is None:
            continue
        found[name] = version
        pending += [Requirement(r) for r in requires_of(name)]
    return found


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def project_requirements(path: Path = REPO / "requirements.txt") -> list[str]:
    """requirements.txt without comments and blank lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def read_name_list(path: Path) -> set[str]:
    """Canonical package names of a one-per-line file (``#`` comments allowed)."""
    names = (line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return {canonicalize_name(n) for n in names if n}


def carried_set(closure: dict[str, str], device_has: set[str]) -> dict[str, str]:
    """The core packages plus the closure's packages the machine lacks."""
    return {n: v for n, v in sorted(closure.items()) if n in CORE or n not in device_has}


def platform_tags(glibc_minor: int) -> list[str]:
    """manylinux x86_64 tags from glibc 2.17 up to 2.<glibc_minor>."""
    return ["manylinux2014_x86_64"] + [f"manylinux_2_{m}_x86_64" for m in range(17, glibc_minor + 1)]


def pip_download(specs: list[str], dest: Path, python_version: str, glibc_minor: int) -> None:
    """``pip download --no-deps`` of binary wheels for the target interpreter and platform."""
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
           "--abi", "none"]
    for tag in platform_tags(glibc_minor):
        cmd += ["--platform", tag]
    subprocess.run(cmd + specs, check=True)


def deepspeed_spec(path: Path = REPO / "requirements-deepspeed.txt") -> str:
    """The deepspeed requirement the project tests (``deepspeed==X``), from requirements-deepspeed.txt."""
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            return line
    raise ValueError(f"{path}: no requirement")


def carry_deepspeed(dest: Path, python_version: str, glibc_minor: int, device_has: set[str]) -> bool:
    """Build the deepspeed wheel into ``dest`` and download what it needs that the machine lacks (at the
    versions installed here). False, with a line on stderr, where deepspeed is not installed here."""
    spec = deepspeed_spec()
    closure = requirement_closure([spec], _installed_version, lambda n: metadata.distribution(n).requires or [])
    if "deepspeed" not in closure:
        print("warning: deepspeed is not installed here (make setup-deepspeed): not carried", file=sys.stderr)
        return False
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
                    str(dest), f"deepspeed=={closure['deepspeed']}"], check=True, env=dict(os.environ, DS_BUILD_OPS="0"))
    have = {canonicalize_name(w.name.split("-")[0]) for w in dest.glob("*.whl")}
    needed = [f"{n}=={v}" for n, v in sorted(closure.items()) if n not in have and n not in device_has]
    if needed:
        pip_download(needed, dest, python_version, glibc_minor)
    return True


def bnb_cuda_builds(wheel: Path) -> list[str]:
    """The CUDA versions a bitsandbytes wheel has native libraries for ("130" for CUDA 13.0)."""
    with zipfile.ZipFile(wheel) as z:
        tags = [m.group(1) for m in map(BNB_LIB.match, z.namelist()) if m]
    return sorted(t[4:] for t in tags if t.startswith("cuda"))


def slim_bitsandbytes(wheel: Path, keep_cuda: Iterable[str]) -> None:
    """Rewrite a bitsandbytes wheel in place with only the native libraries for the CUDA versions in
    ``keep_cuda`` (e.g. "130") and the CPU one (ROCm and XPU builds go too); RECORD lists exactly what
    stays, so pip installs it as any wheel."""
    keep = {f"cuda{v}" for v in keep_cuda} | {"cpu"}
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {n for n, m in ((n, BNB_LIB.match(n)) for n in src.namelist()) if m and m.group(1) not in keep}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode("utf-8").splitlines()
                data = ("\n".join(line for line in lines if line.split(",")[0] not in dropped) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(wheel)


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist lines) from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode("utf-8", errors="replace")
    fields = [line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line]
    get = {k.strip(): v.strip() for k, v in fields if k.strip() in ("Name", "Version")}
    requires = [v.strip() for k, v in fields if k.strip() == "Requires-Dist"]
    return canonicalize_name(get["Name"]), get["Version"], requires


def torch_requirement(requires: list[str]) -> str:
    """The specifier of ``torch`` among Requires-Dist lines ("" when there is none)."""
    for line in requires:
        req = Requirement(line)
        if canonicalize_name(req.name) == "torch" and not req.marker:
            return str(req.specifier)
    return ""


def cudart_major(wheel: Path) -> int | None:
    """The CUDA runtime major version the wheel's native code links (``libcudart.so.N``), or None."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.endswith(".so"):
                found = re.search(rb"libcudart\.so\.(\d+)", z.read(name))
                if found:
                    return int(found.group(1))
    return None


def describe(wheel: Path) -> dict:
    """The manifest entry of one wheel."""
    name, version, requires = wheel_metadata(wheel)
    entry = {"file": wheel.name, "name": name, "version": version, "bytes": wheel.stat().st_size}
    if name == "xformers":
        entry.update(torch=torch_requirement(requires), cudart_major=cudart_major(wheel))
    if name == "bitsandbytes":
        entry.update(torch=torch_requirement(requires), cuda_libs=bnb_cuda_builds(wheel))
    return entry


def build_parser() -> argparse.ArgumentParser:
    """Options of the preparation step."""
    p = argparse.ArgumentParser(prog="wheels.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--dest", default=str(HERE / "wheels"), help="folder for the wheels (emptied of old wheels)")
    p.add_argument("--python-version", default="3.12",
                   help="the GPU machine's CPython minor (default 3.12, as its image has; see KINDS.md)")
    p.add_argument("--glibc", type=int, default=39, help="newest manylinux_2_N tag to accept (default 39)")
    p.add_argument("--bnb-cuda", default=DEFAULT_BNB_CUDA,
                   help="CUDA builds of bitsandbytes to keep, e.g. 130,132 (default), or all (43 MB)")
    p.add_argument("--no-xformers", action="store_true", help="do not carry xformers")
    p.add_argument("--no-bitsandbytes", action="store_true", help="do not carry bitsandbytes")
    p.add_argument("--no-deepspeed", action="store_true", help="do not carry deepspeed (--deepspeed runs)")
    p.add_argument("--xformers-spec", default="xformers", help="pip requirement for xformers (default newest)")
    p.add_argument("--bnb-spec", default="bitsandbytes", help="pip requirement for bitsandbytes (default newest)")
    p.add_argument("--extra", nargs="*", default=[], help="more requirements to carry (NAME==VERSION)")
    p.add_argument("--device-packages", default=str(HERE / "device_packages.txt"),
                   help="packages the GPU machine already has (one per line)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Download, slim, describe; print the sizes."""
    args = build_parser().parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    closure = requirement_closure(project_requirements(), _installed_version,
                                  lambda n: metadata.distribution(n).requires or [])
    device_has = read_name_list(Path(args.device_packages))
    carried = carried_set(closure, device_has)
    missing = [n for n in CORE if n not in carried]
    if missing:
        print(f"error: {', '.join(missing)} not installed in {sys.executable}; run make setup first", file=sys.stderr)
        return 2
    pip_download([f"{n}=={v}" for n, v in carried.items()] + list(args.extra), dest, args.python_version, args.glibc)
    optional = [] if args.no_xformers else [args.xformers_spec]
    optional += [] if args.no_bitsandbytes else [args.bnb_spec]
    if optional:
        pip_download(optional, dest, args.python_version, args.glibc)
    if not args.no_deepspeed:
        carry_deepspeed(dest, args.python_version, args.glibc, device_has)
    if args.bnb_cuda != "all":
        for wheel in dest.glob("bitsandbytes-*.whl"):
            slim_bitsandbytes(wheel, [v.strip() for v in args.bnb_cuda.split(",") if v.strip()])
    entries = [describe(w) for w in sorted(dest.glob("*.whl"))]
    total = sum(e["bytes"] for e in entries)
    manifest = {"python_version": args.python_version, "wheels": entries, "total_bytes": total}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    for e in entries:
        print(f"{e['bytes'] / 2**20:8.2f} MiB  {e['file']}")
    print(f"{total / 2**20:8.2f} MiB  total in {dest} ({len(entries)} wheels)")
    if total > SIZE_BUDGET:
        print(f"warning: over {SIZE_BUDGET // 2**20} MiB: the device tool copies at most 64 MiB with the working "
              "tree; drop --bnb-cuda all or use --no-bitsandbytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
