"""Fine-tuning: train the whole UNet (and optionally the text encoder) of a Stable Diffusion 1.x/2.x model
from images with captions in a metadata json.

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \\
        --in_json meta_lat.json --train_data_dir train_data --output_dir out --learning_rate 5e-6 ...

See docs/fine_tune.md for every option.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from library.cli import run_main


def build_parser() -> argparse.ArgumentParser:
    """All options of fine_tune.py (kohya names)."""
    from library.methods.full_model import add_full_model_saving_arguments
    from library.training import args as training_args

    parser = training_args.build_training_parser(
        "fine_tune.py", __doc__.strip().splitlines()[0], support_dreambooth=False, support_caption=True,
        support_caption_dropout=True)
    add_full_model_saving_arguments(parser)
    from library.training.lr_options import add_text_encoder_lr_arguments
    add_text_encoder_lr_arguments(parser)  # --learning_rate_te
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--train_text_encoder", action="store_true", help="also train the text encoder (default: UNet only)")
    g.add_argument("--diffusers_xformers", action="store_true",
                   help="diffusers' own xformers attention in the UNet and VAE (needs the package 'xformers')")
    from library.training.precision_options import add_no_half_vae_arguments
    add_no_half_vae_arguments(g)  # --no_half_vae
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train, and say where the model went."""
    from library.config.option_file import parse_with_config_file
    args = parse_with_config_file(build_parser(), argv)
    from library.errors import UserError
    from library.methods.full_model import FullModelMethod, output_layout, prepare_full_model, resolve_save_format
    from library.models.save import precision_dtype
    from library.dataset_debug import debug_dataset
    from library.dry_run.report import run_dry_run
    from library.training import session
    from library.training.args import dry_run_requested, validate_training_args
    from library.training.sampling import sample_settings

    if args.diffusers_xformers and importlib.util.find_spec("xformers") is None:
        raise UserError("--diffusers_xformers needs the package 'xformers' (pip install xformers); without it "
                        "PyTorch's scaled-dot-product attention is used by default")
    validate_training_args(args)
    if args.debug_dataset:
        return debug_dataset(args, support_dreambooth=False, support_caption=True)
    sampling = sample_settings(args)
    save_dtype = precision_dtype(args.save_precision)
    te_steps = None if args.train_text_encoder else 0
    layout = output_layout(args.save_model_as, args.use_safetensors, args.pretrained_model_name_or_path)
    if dry_run_requested(args):  # report and exit before anything is loaded (docs/dry_run.md)
        return run_dry_run(args, "finetune", layout=layout, support_dreambooth=False, support_finetuning=True)
    run = session.prepare_run(args, "finetuning", layout=layout, support_dreambooth=False, support_finetuning=True)
    accelerator, model, weight_dtype = run.accelerator, run.model, run.weight_dtype
    prepare_full_model(model, text_encoder_trains=args.train_text_encoder,
                       gradient_checkpointing=args.gradient_checkpointing, device=accelerator.device,
                       weight_dtype=weight_dtype, full_half=args.full_fp16 or args.full_bf16,
                       vae_dtype=run.vae_dtype)

    from library.modelspec import run_fields

    method = FullModelMethod(model=model, text_encoder_steps=te_steps, clip_skip=args.clip_skip,
                             max_token_length=args.max_token_length, weighted_captions=args.weighted_captions,
                             no_token_padding=False,
                             save_format=resolve_save_format(args.save_model_as, args.use_safetensors,
                                                             model.source_format),
                             save_dtype=save_dtype, device=accelerator.device,
                             header=run_fields(args, run.group), learning_rate_te=args.learning_rate_te)
    what = "UNet + text encoder" if args.train_text_encoder else "UNet only"
    return session.train(args, run, method, sampling=sampling, description=f"fine-tuning, {what}",
                         result_name="model")


if __name__ == "__main__":
    sys.exit(run_main(main))
