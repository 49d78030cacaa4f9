"""DreamBooth: train the whole UNet and text encoder of a Stable Diffusion 1.x/2.x model on a few images.

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \\
        --dataset_config data.toml --output_dir out --learning_rate 1e-6 --max_train_steps 1600 ...

See docs/train_db.md for every option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from library.cli import run_main


def build_parser() -> argparse.ArgumentParser:
    """All options of train_db.py (kohya names)."""
    from library.methods.full_model import add_full_model_saving_arguments
    from library.training import args as training_args

    parser = training_args.build_training_parser(
        "train_db.py", __doc__.strip().splitlines()[0], support_dreambooth=True, support_caption=False,
        support_caption_dropout=True)
    add_full_model_saving_arguments(parser)
    from library.training.lr_options import add_text_encoder_lr_arguments
    add_text_encoder_lr_arguments(parser)  # --learning_rate_te
    g = parser.add_argument_group("DreamBooth")
    g.add_argument("--stop_text_encoder_training", type=int, default=None,
                   help="train the text encoder only for the first N steps (negative: never train it)")
    g.add_argument("--no_token_padding", action="store_true",
                   help="pad captions only to the batch's longest (max 77 tokens), as the original DreamBooth "
                        "script; --max_token_length and --clip_skip are then bypassed")
    from library.training.precision_options import add_no_half_vae_arguments
    add_no_half_vae_arguments(g)  # --no_half_vae
    return parser


def text_encoder_steps(stop_text_encoder_training: int | None) -> int | None:
    """``--stop_text_encoder_training`` as the method's policy: None = whole run, negative or 0 = never."""
    if stop_text_encoder_training is None:
        return None
    return max(0, stop_text_encoder_training)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train, and say where the model went."""
    from library.config.option_file import parse_with_config_file
    args = parse_with_config_file(build_parser(), argv)
    from library.methods.full_model import FullModelMethod, output_layout, prepare_full_model, resolve_save_format
    from library.models.save import precision_dtype
    from library.dataset_debug import debug_dataset
    from library.dry_run.report import run_dry_run
    from library.training import session
    from library.training.args import dry_run_requested, validate_training_args
    from library.training.sampling import sample_settings

    validate_training_args(args)
    if args.debug_dataset:
        return debug_dataset(args, support_dreambooth=True, support_caption=False)
    sampling = sample_settings(args)
    save_dtype = precision_dtype(args.save_precision)
    te_steps = text_encoder_steps(args.stop_text_encoder_training)
    layout = output_layout(args.save_model_as, args.use_safetensors, args.pretrained_model_name_or_path)
    if dry_run_requested(args):  # report and exit before anything is loaded (docs/dry_run.md)
        return run_dry_run(args, "dreambooth", layout=layout, support_dreambooth=True, support_finetuning=False)
    run = session.prepare_run(args, "dreambooth", layout=layout, support_dreambooth=True, support_finetuning=False)
    accelerator, model, weight_dtype = run.accelerator, run.model, run.weight_dtype
    prepare_full_model(model, text_encoder_trains=te_steps != 0, gradient_checkpointing=args.gradient_checkpointing,
                       device=accelerator.device, weight_dtype=weight_dtype,
                       full_half=args.full_fp16 or args.full_bf16, vae_dtype=run.vae_dtype)

    from library.modelspec import run_fields

    method = FullModelMethod(model=model, text_encoder_steps=te_steps, clip_skip=args.clip_skip,
                             max_token_length=args.max_token_length, weighted_captions=args.weighted_captions,
                             no_token_padding=args.no_token_padding,
                             save_format=resolve_save_format(args.save_model_as, args.use_safetensors,
                                                             model.source_format),
                             save_dtype=save_dtype, device=accelerator.device,
                             header=run_fields(args, run.group), learning_rate_te=args.learning_rate_te)
    te_text = {None: "UNet + text encoder", 0: "UNet only"}.get(te_steps, f"UNet + text encoder for {te_steps} steps")
    return session.train(args, run, method, sampling=sampling, description=f"DreamBooth, {te_text}",
                         result_name="model")


if __name__ == "__main__":
    sys.exit(run_main(main))
