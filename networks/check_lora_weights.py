"""Print the weight statistics of every LoRA module (spot untrained, all-zero ``lora_up`` modules).

    python networks/check_lora_weights.py my_lora.safetensors

Output: "number of LoRA modules: N" (N counts the lora_up and lora_down keys, i.e. twice the module
count, as the reference does), then one line per key: ``<key>,<shape as (a-b)>,<mean |w|>,<min |w|>``
computed in float32. ``-s/--show_all_keys`` also lists the other keys (alphas …).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.cli import run_main  # noqa: E402
from networks.lora_files import load_lora_file  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("file", help="LoRA file (.safetensors, .pt or .ckpt)")
    p.add_argument("-s", "--show_all_keys", action="store_true",
                   help="also list the keys that are not lora_up/lora_down weights (alphas …)")
    return p


def stats_line(key: str, value: torch.Tensor) -> str:
    """``<key>,<shape>,<mean |w|>,<min |w|>`` with the shape written ``(a-b-c)``."""
    value = value.detach().to(torch.float32).abs()
    shape = str(tuple(value.shape)).replace(", ", "-")
    if value.numel() == 0:
        return f"{key},{shape},nan,nan"
    return f"{key},{shape},{float(value.mean())},{float(value.min())}"


def main(argv: Sequence[str] | None = None) -> int:
    """Load the file (one-line error and exit 2 when it is not a LoRA) and print the statistics."""
    args = setup_parser().parse_args(argv)
    print(f"loading: {args.file}")
    lora = load_lora_file(args.file, "file")
    values = [(k, v) for k, v in lora.tensors.items() if "lora_up" in k or "lora_down" in k]
    print(f"number of LoRA modules: {len(values)}")
    if args.show_all_keys:
        values += [(k, v) for k, v in lora.tensors.items() if "lora_up" not in k and "lora_down" not in k]
        print(f"number of all modules: {len(values)}")
    zero_up = 0
    for key, value in values:
        print(stats_line(key, value))
        if "lora_up" in key and not bool(value.detach().float().abs().amax() > 0):
            zero_up += 1
    if zero_up:
        print(f"{zero_up} module(s) have an all-zero lora_up weight (untrained: they change nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
