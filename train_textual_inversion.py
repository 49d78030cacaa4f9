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
    from library.methods.base import MethodStart
    from library.modelspec import run_fields
    from library.run_start import ScriptSupport, start_run
    from library.training import session

    token = ti.check_options(args.token_string, args.num_vectors_per_token)
    if args.weighted_captions:
        raise UserError("--weighted_captions is not supported by Textual Inversion training")

    def replacements(opts):
        return ti.caption_replacements(token, opts.embedding.num_vectors_per_token,
                                       object_template=opts.embedding.use_object_template,
                                       style_template=opts.embedding.use_style_template)

    def method_start(opts) -> MethodStart:
        captions = replacements(opts)

        def configure_group(group):
            group.replacements = captions
            if not captions.get(""):
                ti.warn_captions_without_token(group, token)

        layout = ti.output_layout(opts.save.save_model_as)
        return MethodStart(layout=layout, output_name=opts.save.output_name or token,  # the token by default
                           text_encoder_use=ti.TEXT_ENCODER_USE,
                           dry_run_plan=lambda: (xti_method if xti else ti).dry_run_plan(opts.embedding, layout),
                           configure_group=configure_group)

    started = start_run(
        args, ScriptSupport("xti" if xti else "textual_inversion", dreambooth=True, captions=True),
        method_start, debug_extras=lambda opts: dict(replacements=replacements(opts), new_tokens=ti.token_strings(
            opts.embedding.token_string, opts.embedding.num_vectors_per_token)))
    if isinstance(started, int):  # --debug_dataset, --dry_run
        return started
    opts, run = started.opts, started.run
    device, vectors = run.accelerator.device, opts.embedding.num_vectors_per_token
    common = dict(model=run.model, token_string=token, clip_skip=opts.model.clip_skip,
                  max_token_length=opts.data.max_token_length, save_format=opts.save.save_model_as,
                  save_dtype=started.save_dtype, device=device,
                  gradient_checkpointing=opts.model.gradient_checkpointing,
                  header=run_fields(opts.metadata, output_name=run.output_name, clip_skip=opts.model.clip_skip,
                                    group=run.group))
    placement = dict(seed=run.seed, gradient_checkpointing=opts.model.gradient_checkpointing, device=device,
                     weight_dtype=run.weight_dtype, vae_dtype=run.vae_dtype,
                     full_half=opts.training.full_fp16 or opts.training.full_bf16)
    if xti:
        layers, ids = xti_method.prepare_xti(run.model, run.tokenizer, opts.embedding, **placement)
        method = xti_method.XTIMethod(layer_names=layers, num_vectors=vectors, token_ids=ids, **common)
        what = f"XTI, {vectors} vector(s) x {len(layers)} layers for {token!r}"
    else:
        ids = ti.prepare_textual_inversion(run.model, run.tokenizer, opts.embedding, **placement)
        method = ti.TextualInversionMethod(token_ids=ids, **common)
        what = f"Textual Inversion, {len(ids)} vector(s) for {token!r}"
    return session.train(started, method, description=what, result_name="XTI embedding" if xti else "embedding",
                         sampler_options=dict(prompt_transform=ti.expand_prompt(token, vectors),
                                              layer_encoder=method.encode_layers if xti else None))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train, and say where the embedding went."""
    from library.config.option_file import parse_with_config_file
    return train(parse_with_config_file(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
