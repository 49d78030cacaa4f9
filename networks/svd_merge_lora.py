"""Merge LoRAs exactly, then re-factorise the sum by SVD to a new rank.

    python networks/svd_merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors \\
        --ratios 0.6 0.4 --new_rank 32 --new_conv_rank 16 --device cuda

Per module (union over the files): M = Σ_k ratio_k · alpha_k/rank_k · up_k∘down_k (exact), then
M ≈ up·down with up = U[:, :q]·diag(S[:q]), down = Vh[:q], q = min(new rank, in, out), both clamped to
the 0.99-quantile of their entries, alpha = q (tools_and_preprocessing.md §2.2). The ranks of the
inputs may differ; with q ≥ the sum of the input ranks the result is the exact sum up to the clamp.
"""

from __future__ import annotations

import argparse
import logging
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
    common_sd_version,
    load_lora_files,
    refuse_dora,
    merged_lora_metadata,
    save_lora_file,
)
from networks.lora_tool_options import (  # noqa: E402
    add_device_argument,
    add_merge_arguments,
    add_precision_arguments,
    check_merge_args,
    check_ranks,
    output_dtypes,
    torch_device,
)
from networks.lora_svd import CLAMP_QUANTILE, clamp_to_quantile, factor_svd, layer_shaped, truncate  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_precision_arguments(p, save_default="the --precision",
                            precision_help="dtype the LoRA tensors are rounded to before merging (the SVD always "
                                           "runs in float32)")
    add_merge_arguments(p, save_to_help="output LoRA file (.safetensors, or .pt/.ckpt)",
                        models_help="LoRA files to merge (ranks may differ)")
    p.add_argument("--new_rank", type=int, default=4, help="rank of the Linear and 1×1-conv modules (default 4)")
    p.add_argument("--new_conv_rank", type=int, default=None,
                   help="rank of the 3×3-conv modules (default: --new_rank)")
    add_device_argument(p, "the sums and SVDs")
    return p


def svd_merge(loras: Sequence[LoRAFile], ratios: Sequence[float], new_rank: int, new_conv_rank: int | None = None,
              device: torch.device | None = None, merge_dtype: torch.dtype | None = None,
              clamp_quantile: float | None = CLAMP_QUANTILE) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The merged LoRA's tensors (float32, CPU) and the rank of every module.

    ``clamp_quantile`` None skips the clamp (then a rank ≥ the sum of input ranks is exact).
    """
    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    parts: dict[str, list[tuple[LoRAFile, LoRAModuleWeights, float]]] = {}
    for lora, ratio in zip(loras, ratios):
        for name, module in lora.modules.items():
            parts.setdefault(name, []).append((lora, module, ratio))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for name, contributions in tqdm(parts.items(), desc="svd merge", leave=False):
            first_file, first, _ = contributions[0]
            ups, downs = [], []
            for lora, module, ratio in contributions:
                if module.signature() != first.signature():
                    raise UserError(f"cannot merge {first_file.path} and {lora.path}: module {name} is "
                                    f"{first.in_features}→{first.out_features} kernel {first.kernel} in the first "
                                    f"but {module.in_features}→{module.out_features} kernel {module.kernel} in the "
                                    "second (LoRAs of different models)")
                module.check_finite(lora.path)
                up, down = module.factors(merge_dtype, device)
                ups.append(up * (ratio * module.scale))
                downs.append(down)
            svd = factor_svd(torch.cat(ups, dim=1), torch.cat(downs, dim=0))
            rank = min(conv_rank if first.is_conv3x3 else new_rank, first.in_features, first.out_features)
            up, down = truncate(svd, rank)
            if clamp_quantile is not None:
                up, down = clamp_to_quantile(up, down, clamp_quantile)
            up, down = layer_shaped(up, down, first.kernel if first.is_conv else None)
            tensors[f"{name}.{DOWN}"] = down.cpu().contiguous()
            tensors[f"{name}.{UP}"] = up.cpu().contiguous()
            tensors[f"{name}.{ALPHA}"] = torch.tensor(float(rank))
            ranks[name] = rank
    return tensors, ranks


def main(argv: Sequence[str] | None = None) -> int:
    """Check the options, load, merge, re-factorise, save."""
    args = setup_parser().parse_args(argv)
    save_to = check_merge_args(args)
    check_ranks(new_rank=args.new_rank, new_conv_rank=args.new_conv_rank)
    merge_dtype, save_dtype = output_dtypes(args)
    device = torch_device(args.device)
    loras = load_lora_files(args.models, "--models")
    for lora in loras:
        refuse_dora(lora, "svd_merge_lora.py", "--models")
    common_sd_version(loras)
    logger.info("new rank: %d, new conv rank: %s", args.new_rank, args.new_conv_rank or args.new_rank)
    tensors, ranks = svd_merge(loras, args.ratios, args.new_rank, args.new_conv_rank, device, merge_dtype)
    metadata = merged_lora_metadata(loras, tensors)
    save_lora_file(tensors, save_to, metadata, save_dtype)
    print(f"saved {len(ranks)} modules (ranks {sorted(set(ranks.values()))}) to {save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
