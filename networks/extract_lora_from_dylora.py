"""Split a DyLoRA file into ordinary fixed-rank LoRA files, one per multiple of the training unit.

    python networks/extract_lora_from_dylora.py --model dylora.safetensors \\
        --save_to split.safetensors --unit 4

A DyLoRA of rank R trained with ``unit=u`` writes ``split-0004.safetensors``, ``split-0008…`` for
every multiple of u below R (the rank-R LoRA is the input file itself). Each keeps the first q rank
components of every module; alpha is kept as trained (so a rank-q split has scale alpha/q).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

DYLORA_MODULE = "networks.dylora"


def setup_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--unit", type=int, default=None,
                   help="the DyLoRA training unit (network_args unit=…); default: read from the file's metadata")
    p.add_argument("--save_to", type=str, default=None,
                   help="base output name; the rank is appended as -0004 etc. before the extension")
    p.add_argument("--model", type=str, default=None, help="DyLoRA file (.safetensors, or .pt/.ckpt)")
    return p


def unit_from_metadata(metadata: Mapping[str, str]) -> int | None:
    """The ``unit`` recorded in ``ss_network_args`` (None when absent or unreadable)."""
    try:
        value = json.loads(metadata.get("ss_network_args", "{}")).get("unit")
        return None if value is None else int(str(value).strip())
    except (ValueError, AttributeError, TypeError):
        return None


def split_state_dict(state_dict: Mapping[str, "object"], rank: int) -> dict:
    """The first ``rank`` components of every module: rows of down, columns of up; other keys copied."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".lora_down.weight"):
            value = value[:rank]
        elif key.endswith(".lora_up.weight"):
            value = value[:, :rank]
        out[key] = value.contiguous()
    return out


def split_metadata(metadata: Mapping[str, str], max_rank: int, rank: int) -> dict[str, str]:
    """Input metadata with the split noted in ``ss_training_comment`` and ``ss_network_dim`` = rank.

    The ``sshs_*`` hashes are left out here; the writer computes them for the new file.
    """
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    comment = metadata.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"split from DyLoRA, rank {max_rank} to {rank}; {comment}"
    meta["ss_network_dim"] = str(rank)
    return meta


def output_path(save_to: str, rank: int) -> Path:
    """``<save_to without extension>-<rank, 4 digits><extension>``."""
    path = Path(save_to)
    return path.with_name(f"{path.stem}-{rank:04d}{path.suffix}")


def _resolve_unit(args: argparse.Namespace, metadata: Mapping[str, str]) -> int:
    recorded = unit_from_metadata(metadata)
    unit = args.unit if args.unit is not None else recorded
    if unit is None:
        raise UserError(f"--unit is required: {args.model} does not record the DyLoRA unit in its metadata "
                        "(give the network_args unit=… used for training)")
    if unit < 1:
        raise UserError(f"--unit {unit}: must be at least 1")
    if recorded is not None and args.unit is not None and recorded != args.unit:
        logger.warning("--unit %d differs from the unit=%d recorded in %s", args.unit, recorded, args.model)
    return unit


def main(argv: Sequence[str] | None = None) -> int:
    """Write one LoRA file per multiple of the unit below the DyLoRA's rank."""
    from networks.lora_common import save_state_dict_file
    from networks.lora_files import load_lora_file
    from networks.lora_tool_options import require_options

    args = setup_parser().parse_args(argv)
    require_options(args, model="the DyLoRA file to split", save_to="base name of the split files")
    lora = load_lora_file(args.model, "--model")
    state_dict, metadata = lora.tensors, lora.metadata
    module = metadata.get("ss_network_module")
    if module is not None and module != DYLORA_MODULE:
        raise UserError(f"--model {args.model} is not a DyLoRA file: its ss_network_module is '{module}', "
                        f"expected '{DYLORA_MODULE}' (only DyLoRA ranks can be cut out without loss)")
    ranks = {name: weights.rank for name, weights in lora.modules.items()}
    if module is None:
        logger.warning("%s has no ss_network_module metadata; assuming it is a DyLoRA file", args.model)
    unit = _resolve_unit(args, metadata)
    bad = sorted(name for name, r in ranks.items() if r % unit)
    if bad:
        raise UserError(f"--unit {unit}: the rank {ranks[bad[0]]} of {bad[0]} (and {len(bad) - 1} more modules) "
                        f"is not a multiple of the unit; is --model a DyLoRA file trained with unit={unit}?")
    max_rank = max(ranks.values())
    targets = list(range(unit, max_rank, unit))
    if not targets:
        raise UserError(f"--unit {unit}: the DyLoRA rank is {max_rank}, so there is no smaller rank to split out "
                        "(ranks are multiples of the unit below the full rank)")
    from library.output_safety import check_target

    source = Path(args.model).resolve()
    for rank in targets:
        path = output_path(args.save_to, rank)
        if path.resolve() == source:
            raise UserError(f"--save_to {args.save_to}: the split file {path} would overwrite --model")
        check_target(path, "network", what="--save_to")

    print(f"DyLoRA rank {max_rank}, unit {unit}: writing ranks {', '.join(map(str, targets))}")
    for rank in targets:
        path = output_path(args.save_to, rank)
        save_state_dict_file(split_state_dict(state_dict, rank), path, split_metadata(metadata, max_rank, rank))
        print(f"saved rank {rank} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
