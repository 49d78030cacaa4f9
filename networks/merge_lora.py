"""Merge LoRAs into a Stable Diffusion model, or several LoRAs into one LoRA.

    python networks/merge_lora.py --sd_model model.safetensors --save_to merged.safetensors \\
        --models a.safetensors b.safetensors --ratios 0.8 0.5
    python networks/merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors --ratios 0.6 0.4

With ``--sd_model`` every LoRA is added to the model's weights, ``W ← W + ratio · alpha/rank · up∘down``
(text encoder and UNet, 3×3 convolutions included; a DoRA module adds ``ratio · (W' − W)``, see
networks/lora_dora.py), and the model is saved: an ldm single file keeps
every other key of the input file (EMA weights etc.). LoHa/LoKr files merge the same way with the ΔW of
their type (networks/lycoris_common.py), OFT files as ``W ← W + ratio · (RᵀW − W)`` blockwise
(networks/oft.py). Without it the LoRAs are combined into one LoRA
of the same rank (tools_and_preprocessing.md §2.1): this is not the exact sum of the LoRAs; use
svd_merge_lora.py for that (neither takes LoHa/LoKr/OFT files).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from networks.lora_common import adapt_shape  # noqa: E402
from networks.lora_files import (  # noqa: E402
    ALPHA,
    DOWN,
    UP,
    LoRAFile,
    common_sd_version,
    load_lora_files,
    match_lora_to_model,
    merge_module_into_layer,
    merged_lora_metadata,
    model_lora_layers,
    refuse_dora,
    save_lora_file,
)
from networks.lora_tool_options import (  # noqa: E402
    add_merge_arguments,
    add_precision_arguments,
    check_merge_args,
    output_dtypes,
)

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def setup_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--v2", action="store_true",
                   help="the --sd_model is SD2.x (the version is also read from the weights; a mismatch warns)")
    add_precision_arguments(p, save_default="the --precision",
                            precision_help="dtype the LoRA tensors and the text encoder/UNet are cast to for "
                                           "merging (default float)")
    p.add_argument("--sd_model", default=None,
                   help="Stable Diffusion model to merge into: ldm .ckpt/.safetensors file or diffusers folder; "
                        "omitted: merge the LoRAs into one LoRA")
    add_merge_arguments(p, save_to_help="output: a .safetensors/.ckpt file (a checkpoint or a LoRA, by extension); "
                                        "with a diffusers --sd_model a name without extension writes a diffusers "
                                        "folder",
                        models_help="LoRA files, applied in order")
    return p


# ----------------------------------------------------------------------------------------------
# Mode A: into a model


def model_save_format(save_to: Path, sd_model: Path) -> str:
    """ldm single file when ``save_to`` has an extension, else a diffusers folder (weights in the input
    folder's format, safetensors by default)."""
    if save_to.suffix:
        return "safetensors" if save_to.suffix.lower() == ".safetensors" else "ckpt"
    if sd_model.is_dir() and any((sd_model / "unet").glob("*.bin")) and \
            not any((sd_model / "unet").glob("*.safetensors")):
        return "diffusers"
    return "diffusers_safetensors"


def merge_into_model(args, loras: list[LoRAFile], merge_dtype: torch.dtype, save_dtype: torch.dtype) -> None:
    """Load the model, add every LoRA, save it in the format ``--save_to`` asks for."""
    from library.models.load import load_model
    from library.models.save import save_model

    sd_model = Path(args.sd_model)
    save_to = Path(args.save_to)
    fmt = model_save_format(save_to, sd_model)
    logger.info("loading SD model: %s", sd_model)
    model = load_model(sd_model, v2=True if args.v2 else None, dtype=torch.float32)
    model.text_encoder.to(merge_dtype)
    model.unet.to(merge_dtype)
    version = "sd2" if model.v2 else "sd1"
    layers = model_lora_layers(model.text_encoder, model.unet)
    matched = [match_lora_to_model(lora, layers, version, f"--sd_model {sd_model}") for lora in loras]
    for lora, ratio, found in zip(loras, args.ratios, matched):
        logger.info("merging %s (ratio %s): %d of %d modules", lora.path, ratio, len(found), len(lora.modules))
        for name, layer in tqdm(found.items(), desc=lora.path.name, leave=False):
            merge_module_into_layer(layer, lora.modules[name], ratio, merge_dtype)
    logger.info("saving SD model to: %s", save_to)
    save_model(model, save_to, fmt, save_dtype=save_dtype)
    print(f"merged {len(loras)} LoRA(s) into {sd_model}; saved {fmt} to {save_to}")


# ----------------------------------------------------------------------------------------------
# Mode B: LoRAs into one LoRA


def merge_lora_weights(loras: Sequence[LoRAFile], ratios: Sequence[float], merge_dtype: torch.dtype | None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """Combine LoRAs of equal rank into one, per module name n (union over the files):

    the first file with n fixes the base alpha α₀ (and the shapes); file k contributes
    c_k = ratio_k · √(α_k/α₀) times its down weight and |c_k| times its up weight, summed; alpha = α₀.
    The delta of the result is (α₀/r)(Σ|c_k|U_k)(Σc_k D_k): one file at ratio m gives m²·ΔW (sign kept),
    several files add cross terms. Returns (tensors, rank per module, alpha per module).
    """
    merged: dict[str, dict[str, torch.Tensor]] = {}
    base_alpha: dict[str, float] = {}
    first_file: dict[str, LoRAFile] = {}
    for lora, ratio in zip(loras, ratios):
        logger.info("%s: dims %s, alphas %s", lora.path, lora.dims(), lora.alphas())
        for name, module in lora.modules.items():
            down, up = module.weights(merge_dtype)
            if name not in merged:
                base_alpha[name], first_file[name] = module.alpha_value, lora
                merged[name] = {DOWN: torch.zeros_like(down), UP: torch.zeros_like(up)}
            target = merged[name]
            first = first_file[name].modules[name]
            if module.signature() != first.signature() or module.rank != first.rank:
                raise UserError(
                    f"cannot merge {first_file[name].path} and {lora.path}: module {name} has rank "
                    f"{first.rank} ({first.in_features}→{first.out_features}) in the first and rank {module.rank} "
                    f"({module.in_features}→{module.out_features}) in the second; merge_lora.py needs LoRAs of the "
                    "same rank and model (use svd_merge_lora.py for different ranks)")
            c = ratio * math.sqrt(module.alpha_value / base_alpha[name])
            target[DOWN] += c * adapt_shape(down, target[DOWN].shape)
            target[UP] += abs(c) * adapt_shape(up, target[UP].shape)
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in merged.items():
        tensors[f"{name}.{DOWN}"] = parts[DOWN]
        tensors[f"{name}.{UP}"] = parts[UP]
        tensors[f"{name}.{ALPHA}"] = torch.tensor(base_alpha[name], dtype=torch.float32)
    ranks = {name: int(parts[DOWN].shape[0]) for name, parts in merged.items()}
    return tensors, ranks, base_alpha


def merge_loras_to_file(args, loras: list[LoRAFile], merge_dtype: torch.dtype, save_dtype: torch.dtype) -> None:
    """Mode B: write the combined LoRA with minimal ``ss_*`` metadata and hashes (DoRA files refused)."""
    for lora in loras:
        refuse_dora(lora, "merge_lora.py without --sd_model (LoRAs into one LoRA)", "--models")
    common_sd_version(loras)
    tensors, ranks, alphas = merge_lora_weights(loras, args.ratios, merge_dtype)
    metadata = merged_lora_metadata(loras, tensors)
    print(f"merged LoRA: dims {sorted(set(ranks.values()))}, alphas {sorted(set(alphas.values()))}, "
          f"{len(ranks)} modules")
    save_lora_file(tensors, args.save_to, metadata, save_dtype)
    print(f"saved {args.save_to}")


def main(argv: Sequence[str] | None = None) -> int:
    """Check the options, load the LoRAs, merge, save."""
    args = setup_parser().parse_args(argv)
    into_model = args.sd_model is not None
    if into_model and not Path(args.sd_model).exists():
        raise UserError(f"--sd_model {args.sd_model}: no such file or folder")
    to_folder = into_model and not Path(args.save_to or "").suffix
    save_to = check_merge_args(args, wants_folder=to_folder, other_inputs=[("--sd_model", args.sd_model)],
                               kind=("diffusers" if to_folder else "checkpoint") if into_model else "network")
    merge_dtype, save_dtype = output_dtypes(args)
    loras = load_lora_files(args.models, "--models", allow_lycoris=into_model)
    if into_model:
        merge_into_model(args, loras, merge_dtype, save_dtype)
    else:
        if not save_to.suffix:
            raise UserError(f"--save_to {save_to}: give a file name ending in .safetensors (or .pt/.ckpt) "
                            "for the merged LoRA")
        merge_loras_to_file(args, loras, merge_dtype, save_dtype)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
