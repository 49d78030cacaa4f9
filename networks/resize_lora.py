"""Change the rank of a LoRA by per-module SVD, to a fixed rank or a rank chosen per module.

    python networks/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 8
    python networks/resize_lora.py --model big.safetensors --save_to dyn.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Per module: ΔW = up∘down, SVD, keep the first q singular values (up = U[:, :q]·diag(S[:q]),
down = Vh[:q]) and set alpha = q · alpha/rank so the module's scale is unchanged
(tools_and_preprocessing.md §2.3). Dynamic methods choose q per module (``--new_rank`` is the maximum).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from networks.lora_files import (  # noqa: E402
    ALPHA,
    DOWN,
    UP,
    LoRAFile,
    LoRAModuleWeights,
    load_lora_file,
    refuse_dora,
    save_lora_file,
)
from networks.lora_tool_options import (  # noqa: E402
    add_device_argument,
    add_overwrite_input_argument,
    add_precision_arguments,
    check_ranks,
    check_save_to,
    output_dtypes,
    refuse_overwriting_inputs,
    require_options,
    torch_device,
)
from networks.lora_svd import (  # noqa: E402
    DYNAMIC_METHODS,
    factor_svd,
    layer_shaped,
    retention,
    select_rank,
    truncate,
)

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names, plus the later ``--new_conv_rank``)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_precision_arguments(p, save_default="float")
    p.add_argument("--new_rank", type=int, default=4,
                   help="new rank of every module; with --dynamic_method the maximum rank (default 4)")
    p.add_argument("--new_conv_rank", type=int, default=None,
                   help="new (maximum) rank of the convolution modules, 1×1 included (default: --new_rank)")
    p.add_argument("--save_to", default=None, help="output LoRA file (.safetensors, or .pt/.ckpt)")
    p.add_argument("--model", default=None, help="LoRA file to resize")
    add_overwrite_input_argument(p)
    add_device_argument(p, "the SVDs")
    p.add_argument("--verbose", action="store_true", help="print the retained share of every module")
    p.add_argument("--dynamic_method", default=None, choices=[None, *DYNAMIC_METHODS],
                   help="choose each module's rank: sv_ratio (keep S_j > S_0/param), sv_fro (keep param of the "
                        "Frobenius norm), sv_cumulative (keep param of the sum of singular values)")
    p.add_argument("--dynamic_param", type=float, default=None,
                   help="target of --dynamic_method: a ratio ≥ 1 for sv_ratio, a fraction in (0, 1] otherwise")
    return p


def check_args(args) -> None:
    """Required options and value ranges."""
    require_options(args, model="the LoRA file to resize")
    check_ranks(new_rank=args.new_rank, new_conv_rank=args.new_conv_rank)
    method, param = args.dynamic_method, args.dynamic_param
    if method is None:
        if param is not None:
            logger.warning("--dynamic_param %s is ignored without --dynamic_method", param)
        return
    if not param:
        raise UserError(f"--dynamic_method {method} needs --dynamic_param (a non-zero number)")
    if method == "sv_ratio" and param < 1:
        raise UserError(f"--dynamic_param {param}: sv_ratio needs a ratio of at least 1 (e.g. 2 keeps the "
                        "singular values above half of the largest)")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise UserError(f"--dynamic_param {param}: {method} needs a fraction in (0, 1] (e.g. 0.9)")


def resize_module(module: LoRAModuleWeights, max_rank: int, method: str | None, param: float | None,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float, dict[str, float]]:
    """``(down, up, new alpha, stats)`` of one module at its new rank (float32, CPU).

    The module scale σ = alpha/rank (1 without an alpha key) is kept: new alpha = σ·q.
    """
    up, down = module.factors(None, device)
    svd = factor_svd(up, down)
    values = svd.padded_singular_values()
    rank = select_rank(values, max_rank, method, param)
    new_up, new_down = layer_shaped(*truncate(svd, rank), module.kernel if module.is_conv else None)
    stats = dict(retention(values, rank), rank=rank)
    return new_down.cpu(), new_up.cpu(), module.scale * rank, stats


def first_linear_rank(lora: LoRAFile) -> int:
    """The rank of the first 2-D lora_down in key order (the reference's "from" dimension)."""
    for key, value in lora.tensors.items():
        if key.endswith("." + DOWN) and value.dim() == 2:
            return int(value.shape[0])
    return next(iter(lora.modules.values())).rank


def resize_metadata(lora: LoRAFile, args, old_dim: int, last_alpha: float | None) -> dict[str, str]:
    """The input's metadata with the resize noted (tools_and_preprocessing.md §2.3)."""
    meta = dict(lora.metadata)
    comment = meta.get("ss_training_comment", "")
    if args.dynamic_method is None:
        meta["ss_training_comment"] = f"dimension is resized from {old_dim} to {args.new_rank}; {comment}"
        meta["ss_network_dim"] = str(args.new_rank)
        meta["ss_network_alpha"] = str(last_alpha)
    else:
        meta["ss_training_comment"] = (f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} "
                                       f"from {old_dim}; {comment}")
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    return meta


def verbose_line(name: str, stats: dict[str, float], alpha: float, dynamic: bool) -> str:
    """``<name> | sum(S) retained: x%, fro retained: y%, max(S) ratio: z[, dynamic | dim: q, alpha: a]``."""
    line = (f"{name:75} | sum(S) retained: {stats['sum_retained']:.1%}, fro retained: {stats['fro_retained']:.1%}, "
            f"max(S) ratio: {stats['max_ratio']:0.1f}")
    if dynamic:
        line += f", dynamic | dim: {stats['rank']}, alpha: {alpha}"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Load, resize every module, save with updated metadata."""
    args = setup_parser().parse_args(argv)
    check_args(args)
    save_to = check_save_to(args.save_to)
    refuse_overwriting_inputs(save_to, [("--model", args.model)], allowed=args.overwrite_input)
    _, save_dtype = output_dtypes(args)
    device = torch_device(args.device)
    lora = load_lora_file(args.model, "--model")
    refuse_dora(lora, "resize_lora.py")
    old_dim = first_linear_rank(lora)
    out: dict[str, torch.Tensor] = {}
    fro_values: list[float] = []
    last_alpha = None
    dynamic = args.dynamic_method is not None
    with torch.no_grad():
        for key, value in tqdm(list(lora.tensors.items()), desc="resize", leave=False):
            name, _, rest = key.partition(".")
            if name not in lora.modules or rest not in (DOWN, UP, ALPHA):
                out[key] = value
                continue
            if rest != DOWN:
                continue
            module = lora.modules[name]
            module.check_finite(lora.path)
            max_rank = args.new_conv_rank if (module.is_conv and args.new_conv_rank is not None) else args.new_rank
            down, up, alpha, stats = resize_module(module, max_rank, args.dynamic_method, args.dynamic_param, device)
            out[f"{name}.{DOWN}"], out[f"{name}.{UP}"] = down, up
            out[f"{name}.{ALPHA}"] = torch.tensor(alpha)
            last_alpha = alpha
            if not math.isnan(stats["fro_retained"]):
                fro_values.append(stats["fro_retained"])
            if args.verbose:
                tqdm.write(verbose_line(name, stats, alpha, dynamic))
    if args.verbose and fro_values:
        std = statistics.pstdev(fro_values)
        print(f"Average Frobenius norm retention: {statistics.fmean(fro_values):.2%} | std: {std:0.3f}")
    metadata = resize_metadata(lora, args, old_dim, last_alpha)
    save_lora_file(out, save_to, metadata, save_dtype)
    print(f"resized {len(lora.modules)} modules of {lora.path}; saved {save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
