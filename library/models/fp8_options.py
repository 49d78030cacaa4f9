"""The ``--fp8_base`` / ``--fp8_base_unet`` options and their checks, kept apart from
:mod:`library.models.fp8` (which does the storage) so that parsing never imports torch."""

from __future__ import annotations

import argparse
import logging

from library.option_groups import ModelOptions

logger = logging.getLogger("library.models.fp8")


def add_fp8_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fp8_base`` (every training script, as in kohya's shared training options)."""
    parser.add_argument("--fp8_base", action="store_true",
                        help="[train_network.py] keep the frozen U-Net and text-encoder weights in float8_e4m3fn and "
                             "compute in the --mixed_precision dtype (needs fp16 or bf16); accepted and ignored by "
                             "train_db.py, fine_tune.py and train_textual_inversion.py, as in kohya")


def add_fp8_unet_argument(parser: argparse.ArgumentParser) -> None:
    """``--fp8_base_unet`` (train_network.py only)."""
    parser.add_argument("--fp8_base_unet", action="store_true",
                        help="keep only the U-Net's weights in float8_e4m3fn; the text encoder stays as it is "
                             "(needs --mixed_precision fp16 or bf16)")


def fp8_problems(args: argparse.Namespace) -> list[str]:
    """The option checks of ``--fp8_base`` / ``--fp8_base_unet`` (a warning where the script ignores them)."""
    model = ModelOptions.from_args(args)  # --fp8_base_unet is train_network.py's only: the field default elsewhere
    fp8_base, fp8_unet = model.fp8_base, model.fp8_base_unet
    if not (fp8_base or fp8_unet):
        return []
    if "network_module" not in vars(args):  # train_db / fine_tune / textual inversion
        logger.warning("--fp8_base has no effect in this script (kohya-ss/sd-scripts' SD1/SD2 DreamBooth, "
                       "fine-tuning and Textual Inversion scripts ignore it too); only train_network.py uses it")
        return []
    name = "--fp8_base_unet" if fp8_unet and not fp8_base else "--fp8_base"
    problems = []
    import torch

    if getattr(torch, "float8_e4m3fn", None) is None:
        problems.append(f"{name} needs a torch with torch.float8_e4m3fn (torch >= 2.1); this one has none")
    if args.mixed_precision == "no":
        problems.append(f"{name} needs --mixed_precision fp16 or bf16 (the fp8 weights are computed in that dtype; "
                        "bf16 also works on the CPU)")
    return problems
