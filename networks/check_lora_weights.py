"""Print the weight statistics of every LoRA module (spot untrained, all-zero ``lora_up`` modules).

LoHa/LoKr and OFT files are read too: their ``hada_*``/``lokr_*`` factors or ``oft_blocks`` are listed
instead, and the tensor that starts at zero (``hada_w2_a``, ``lokr_w2``, ``lokr_w2_b`` or ``oft_blocks``) is
the one checked for an untrained module.

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
from networks.lycoris_common import LYCORIS_KEYS, ZERO_INIT_KEYS  # noqa: E402


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


def is_weight_key(key: str) -> bool:
    """A LoRA ``lora_up``/``lora_down`` weight or a LoHa/LoKr factor (not an alpha or other key)."""
    return "lora_up" in key or "lora_down" in key or key.partition(".")[2] in LYCORIS_KEYS


def main(argv: Sequence[str] | None = None) -> int:
    """Load the file (one-line error and exit 2 when it is not a LoRA) and print the statistics."""
    args = setup_parser().parse_args(argv)
    print(f"loading: {args.file}")
    lora = load_lora_file(args.file, "file", allow_lycoris=True)
    values = [(k, v) for k, v in lora.tensors.items() if is_weight_key(k)]
    print(f"number of LoRA modules: {len(values)}")
    if args.show_all_keys:
        values += [(k, v) for k, v in lora.tensors.items() if not is_weight_key(k)]
        print(f"number of all modules: {len(values)}")
    zero: dict[str, int] = {}
    for key, value in values:
        print(stats_line(key, value))
        part = key.partition(".")[2].removesuffix(".weight")
        if part in ("lora_up", *ZERO_INIT_KEYS) and not bool(value.detach().float().abs().amax() > 0):
            zero[part] = zero.get(part, 0) + 1
    for part, count in zero.items():
        print(f"{count} module(s) have an all-zero {part} weight (untrained: they change nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
