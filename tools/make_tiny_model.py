"""Write a random-weight Stable Diffusion model (tiny, mini or full-size) as diffusers and ldm files.

    python tools/make_tiny_model.py out/ --preset tiny-sd1 --seed 0
    → out/tiny-sd1/ (diffusers folder), out/tiny-sd1.safetensors (ldm single file)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.models.presets import PRESET_NAMES  # noqa: E402

FORMATS = ("diffusers", "diffusers_safetensors", "safetensors", "ckpt")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of make_tiny_model.py."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("output_dir", help="folder to write the model(s) into (created if missing)")
    p.add_argument("--preset", default="tiny-sd1", choices=PRESET_NAMES,
                   help="architecture: tiny-sd1 / tiny-sd2 (v-prediction) / mini-sd1 / mini-sd2 for tests, "
                        "sd1 / sd2 / sd2-v for the real SD1.5 / SD2 architecture (default tiny-sd1)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--formats", default="diffusers_safetensors,safetensors",
                   help=f"comma-separated outputs among {', '.join(FORMATS)} (default diffusers_safetensors,safetensors)")
    p.add_argument("--name", default=None, help="base name of the outputs (default: the preset name)")
    p.add_argument("--save_precision", default=None, choices=["float", "fp16", "bf16"],
                   help="dtype of the written weights (default float)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Build the model and write every requested format."""
    args = build_parser().parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"--formats {args.formats}: expected a comma-separated list of {', '.join(FORMATS)}")
    from library.models.random_model import build_random_model
    from library.models.save import precision_dtype, save_model

    start = time.perf_counter()
    model = build_random_model(args.preset, args.seed)
    name = args.name or args.preset
    out = Path(args.output_dir)
    dtype = precision_dtype(args.save_precision)
    for fmt in formats:
        target = out / name if fmt.startswith("diffusers") else out / f"{name}.{fmt}"
        save_model(model, target, fmt, save_dtype=dtype)
        print(f"wrote {target}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
