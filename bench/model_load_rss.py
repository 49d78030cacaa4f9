"""Peak RSS of loading a full-size SD1.5-architecture single-file checkpoint, divided by its size.

    python bench/model_load_rss.py [--dir /tmp/sdtrain_bench_model] [--format safetensors|ckpt]

Builds the checkpoint once with tools/make_tiny_model.py (random weights, fp32), then loads it with
library.models.load.load_model in a fresh process and prints the peak RSS (getrusage ru_maxrss, which
includes the interpreter and the imported libraries) next to the file size. Target: ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import resource, sys, time
sys.path.insert(0, {repo!r})
import torch, diffusers, transformers, accelerate  # import cost measured separately
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
from library.models.load import load_model
m = load_model({path!r})
n = sum(p.numel() for mod in (m.unet, m.vae, m.text_encoder) for p in mod.parameters())
# touch every weight once, as training does, so mmap-backed pages are counted
s = sum(float(p.detach().float().abs().sum()) for mod in (m.unet, m.vae, m.text_encoder) for p in mod.parameters())
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{{base:.0f}} {{peak:.0f}} {{elapsed:.2f}} {{n}}")
"""


def main() -> int:
    """Build the checkpoint if needed, measure in a child process, print the figures."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--dir", default="/tmp/sdtrain_bench_model")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "ckpt"])
    args = p.parse_args()
    out = Path(args.dir)
    path = out / f"sd1.{args.format}"
    if not path.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(out), "--preset", "sd1",
                        "--formats", args.format], check=True)
        print(f"built {path} in {time.perf_counter() - t:.1f} s")
    size_mb = path.stat().st_size / 2**20
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), path=str(path))], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr)
        return 1
    base, peak, elapsed, n = res.stdout.split()[-4:]
    base_f, peak_f = float(base), float(peak)
    print(f"file: {path} ({size_mb:.0f} MiB, {int(n) / 1e6:.0f} M parameters)")
    print(f"RSS after imports: {base_f:.0f} MiB; peak RSS while loading and touching all weights: {peak_f:.0f} MiB")
    print(f"load time: {float(elapsed):.2f} s")
    print(f"peak RSS / file size: {peak_f / size_mb:.3f} (target <= 1.3); "
          f"excluding the import baseline: {(peak_f - base_f) / size_mb:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
