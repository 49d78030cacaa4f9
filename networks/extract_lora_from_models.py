"""Make a LoRA that approximates the difference between two Stable Diffusion models.

    python networks/extract_lora_from_models.py --model_org base.safetensors \\
        --model_tuned fine-tuned.safetensors --save_to lora.safetensors --dim 4 [--conv_dim 4]

The LoRA, applied to --model_org, reproduces (up to its rank) what the fine-tuning changed. Both
models may be ldm single files (.ckpt/.safetensors) or diffusers folders, of the same SD version.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names, plus later-upstream clamp/min_diff/metadata ones)."""
    from networks.lora_extract import DEFAULT_MIN_DIFF
    from networks.lora_tool_options import add_device_argument, add_overwrite_input_argument, add_precision_arguments
    from networks.lora_svd import CLAMP_QUANTILE

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--v2", action="store_true", help="both models are SD2.x (checked against the weights)")
    add_precision_arguments(p, save_default="float")
    p.add_argument("--model_org", type=str, default=None,
                   help="original model (the one the LoRA will be applied to): ldm .ckpt/.safetensors or diffusers folder")
    p.add_argument("--model_tuned", type=str, default=None,
                   help="fine-tuned model; the LoRA approximates tuned - original")
    p.add_argument("--save_to", type=str, default=None,
                   help="output LoRA file (.safetensors, or .pt/.ckpt without metadata); folders are created")
    p.add_argument("--dim", type=int, default=4, help="rank of Linear and 1x1-conv modules (default 4)")
    p.add_argument("--conv_dim", type=int, default=None,
                   help="rank of 3x3-conv modules; enables them (LoRA-C3Lier); default: none (LoRA-LierLa)")
    add_device_argument(p, "the SVDs")
    p.add_argument("--clamp_quantile", type=float, default=CLAMP_QUANTILE,
                   help="clamp the factors to this quantile of their entries (default 0.99; 1 = no clamp)")
    p.add_argument("--min_diff", type=float, default=DEFAULT_MIN_DIFF,
                   help="text encoders whose weights differ by at most this much are taken as identical "
                        "and left out (default 1e-6)")
    p.add_argument("--no_metadata", action="store_true",
                   help="write only the minimal ss_network_* metadata (and the sshs hashes)")
    add_overwrite_input_argument(p)
    return p


def _check_args(args: argparse.Namespace) -> Path:
    """Required options, value ranges, existing models; returns the checked ``--save_to``."""
    from networks.lora_tool_options import check_ranks, check_save_to, refuse_overwriting_inputs, require_options

    require_options(args, model_org="the model the LoRA will be applied to",
                    model_tuned="the fine-tuned model")
    save_to = check_save_to(args.save_to)
    check_ranks(dim=args.dim, conv_dim=args.conv_dim)
    if not 0.0 < args.clamp_quantile <= 1.0:
        raise UserError(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1] (1 = no clamping)")
    if args.min_diff < 0:
        raise UserError(f"--min_diff {args.min_diff}: must not be negative")
    for option in ("model_org", "model_tuned"):
        path = Path(getattr(args, option))
        if not path.exists():
            raise UserError(f"--{option} {path}: no such file or folder")
    refuse_overwriting_inputs(save_to, [("--model_org", args.model_org), ("--model_tuned", args.model_tuned)],
                              allowed=args.overwrite_input)
    return save_to


def _load(path: str, option: str, v2: bool):
    from library.models.load import load_model

    logger.info("loading %s %s", option, path)
    model = load_model(path, v2=v2 if v2 else None)
    model.vae = None  # not needed; frees memory
    return model


def metadata_for(args: argparse.Namespace, v2: bool) -> dict[str, str]:
    """``ss_*`` metadata of the extracted LoRA (minimal set with ``--no_metadata``)."""
    from networks.lora_common import network_metadata

    net_args = {"conv_dim": str(args.conv_dim), "conv_alpha": str(args.conv_dim)} if args.conv_dim else None
    meta = network_metadata("networks.lora", args.dim, args.dim, net_args)
    if not args.no_metadata:
        meta["ss_v2"] = str(v2)
        meta["ss_base_model_version"] = "sd_v2" if v2 else "sd_v1"
        meta["ss_sd_model_name"] = Path(args.model_org).name
        meta["ss_training_comment"] = (f"extracted from the difference of {Path(args.model_tuned).name} "
                                       f"and {Path(args.model_org).name}")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    """Extract the LoRA and write it."""
    from networks.lora import create_network_from_weights
    from networks.lora_extract import extract_state_dict, max_abs_delta, pair_modules
    from networks.lora_files import target_layers
    from networks.lora_tool_options import output_dtypes, torch_device

    args = setup_parser().parse_args(argv)
    save_to = _check_args(args)
    device = torch_device(args.device)
    _, save_dtype = output_dtypes(args)

    org = _load(args.model_org, "--model_org", args.v2)
    tuned = _load(args.model_tuned, "--model_tuned", args.v2)
    if org.v2 != tuned.v2:
        def version(m):
            return "SD2.x" if m.v2 else "SD1.x"
        raise UserError(f"--model_org {args.model_org} is {version(org)} but --model_tuned {args.model_tuned} is "
                        f"{version(tuned)}; a LoRA can only be extracted between models of the same version")

    with_conv = args.conv_dim is not None
    te_pairs = pair_modules(target_layers(org.text_encoder, None, False),
                            target_layers(tuned.text_encoder, None, False),
                            args.dim, args.conv_dim, args.model_org, args.model_tuned)
    unet_pairs = pair_modules(target_layers(None, org.unet, with_conv), target_layers(None, tuned.unet, with_conv),
                              args.dim, args.conv_dim, args.model_org, args.model_tuned)

    te_diff = max_abs_delta(te_pairs)
    if te_diff <= args.min_diff:
        unet_diff = max_abs_delta(unet_pairs)
        if unet_diff <= args.min_diff:
            raise UserError(f"--model_org {args.model_org} and --model_tuned {args.model_tuned} have the same "
                            f"U-Net and text-encoder weights (largest difference {unet_diff:.3g} <= --min_diff "
                            f"{args.min_diff:g}): there is nothing to extract")
        print(f"Text encoder is same. Extract U-Net only. (largest difference {te_diff:.3g} <= --min_diff "
              f"{args.min_diff:g})")
        te_pairs = []
    pairs = te_pairs + unet_pairs

    state = extract_state_dict(pairs, args.clamp_quantile, device)

    # Build a network from the weights (as a user's loader would) to prove the file fits the model.
    network, _ = create_network_from_weights(1.0, None, None, org.text_encoder, org.unet, weights_sd=state,
                                             for_inference=True)
    info = network.load_state_dict(state, strict=False)
    if info.missing_keys or info.unexpected_keys:  # pragma: no cover - an internal naming error
        raise RuntimeError(f"extracted weights do not fit the network: {info}")
    meta = metadata_for(args, org.v2)
    network.save_weights(save_to, save_dtype, meta)
    print(f"LoRA weights saved to {save_to}: {len(te_pairs)} text-encoder and {len(unet_pairs)} U-Net "
          f"modules, rank {args.dim}" + (f", conv rank {args.conv_dim}" if with_conv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
