"""Textual Inversion: learn the embedding of a new token for a frozen Stable Diffusion 1.x/2.x model.

    accelerate launch train_textual_inversion.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir data --output_dir out --token_string zqxdog --init_word dog \\
        --num_vectors_per_token 4 --learning_rate 5e-3 --max_train_steps 1600 ...

See docs/train_textual_inversion.md for every option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from library.cli import OneLineErrorParser, run_main


def build_parser(prog: str = "train_textual_inversion.py", description: str | None = None
                 ) -> argparse.ArgumentParser:
    """All options of train_textual_inversion.py (kohya names); the XTI script uses the same set."""
    from library.methods.textual_inversion import EMBEDDING_FORMATS, add_textual_inversion_arguments
    from library.options import add_data_loading_arguments, add_dataset_group, add_model_arguments
    from library.training import args as training_args

    parser = OneLineErrorParser(prog=prog, description=description or __doc__.strip().splitlines()[0])
    add_model_arguments(parser)
    add_data_loading_arguments(parser)
    add_dataset_group(parser, support_dreambooth=True, support_caption=True, support_caption_dropout=False)
    training_args.add_training_arguments(parser, support_dreambooth=True)
    training_args.add_optimizer_arguments(parser)
    training_args.add_saving_arguments(parser, model_formats=EMBEDDING_FORMATS, default_format="pt")
    training_args.add_logging_arguments(parser)
    training_args.add_sample_arguments(parser)
    add_textual_inversion_arguments(parser)
    from library.training.precision_options import NO_HALF_VAE_SCRIPTS, add_no_half_vae_arguments
    if prog in NO_HALF_VAE_SCRIPTS:  # kohya's XTI script has no --no_half_vae
        add_no_half_vae_arguments(parser)
    return parser


def train(args: argparse.Namespace, *, xti: bool = False) -> int:
    """Set up and run Textual Inversion (``xti``: one set of vectors per UNet cross-attention layer)."""
    from library.errors import UserError
    from library.methods import textual_inversion as ti
    from library.methods import xti as xti_method
    from library.models.save import precision_dtype
    from library.dry_run.report import run_dry_run
    from library.training import session
    from library.training.args import dry_run_requested, validate_training_args
    from library.training.sampling import sample_settings

    token = ti.check_options(args.token_string, args.num_vectors_per_token)
    if args.weighted_captions:
        raise UserError("--weighted_captions is not supported by Textual Inversion training")
    validate_training_args(args)
    replacements = ti.caption_replacements(token, args.num_vectors_per_token, object_template=args.use_object_template,
                                           style_template=args.use_style_template)
    if args.debug_dataset:
        from library.dataset_debug import debug_dataset

        return debug_dataset(args, support_dreambooth=True, support_caption=True, replacements=replacements,
                             new_tokens=ti.token_strings(args.token_string, args.num_vectors_per_token))
    args.output_name = args.output_name or token
    sampling = sample_settings(args)
    save_dtype = precision_dtype(args.save_precision)

    def configure_group(group):
        group.replacements = replacements
        if not replacements.get(""):
            ti.warn_captions_without_token(group, token)

    layout = ti.output_layout(args.save_model_as)
    if dry_run_requested(args):  # report and exit before anything is loaded (docs/dry_run.md)
        return run_dry_run(args, "xti" if xti else "textual_inversion", layout=layout,
                           configure_group=configure_group)
    run = session.prepare_run(args, "xti" if xti else "textual_inversion", layout=layout, support_dreambooth=True,
                              support_finetuning=True, configure_group=configure_group)
    accelerator, seed, tokenizer, model = run.accelerator, run.seed, run.tokenizer, run.model
    weight_dtype = run.weight_dtype
    device = accelerator.device
    common = dict(model=model, token_string=token, clip_skip=args.clip_skip, max_token_length=args.max_token_length,
                  save_format=args.save_model_as, save_dtype=save_dtype, device=device,
                  gradient_checkpointing=args.gradient_checkpointing, header=ti.header_fields(args, run.group))
    if xti:
        layers, ids = xti_method.prepare_xti(model, tokenizer, args, seed=seed, device=device,
                                             weight_dtype=weight_dtype)
        method = xti_method.XTIMethod(layer_names=layers, num_vectors=args.num_vectors_per_token, token_ids=ids,
                                      **common)
        what = f"XTI, {args.num_vectors_per_token} vector(s) x {len(layers)} layers for {token!r}"
    else:
        ids = ti.prepare_textual_inversion(model, tokenizer, args, seed=seed, device=device, weight_dtype=weight_dtype)
        method = ti.TextualInversionMethod(token_ids=ids, **common)
        what = f"Textual Inversion, {len(ids)} vector(s) for {token!r}"
    return session.train(args, run, method, sampling=sampling, description=what,
                         result_name="XTI embedding" if xti else "embedding",
                         sampler_options=dict(prompt_transform=ti.expand_prompt(token, args.num_vectors_per_token),
                                              layer_encoder=method.encode_layers if xti else None))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train, and say where the embedding went."""
    from library.config.option_file import parse_with_config_file
    return train(parse_with_config_file(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
