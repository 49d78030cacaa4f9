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
    from library.methods import embedding_start as embedding
    from library.run_start import ScriptSupport, start_run
    from library.training import session

    token = embedding.check_start(args.token_string, args.num_vectors_per_token, args.weighted_captions)
    started = start_run(args, ScriptSupport("xti" if xti else "textual_inversion", dreambooth=True, captions=True),
                        embedding.method_start(token, xti=xti), debug_extras=embedding.debug_extras(token))
    if isinstance(started, int):  # --debug_dataset, --dry_run
        return started
    method, what = embedding.prepare_method(started, token, xti=xti)
    vectors = started.opts.embedding.num_vectors_per_token
    return session.train(started, method, description=what, result_name="XTI embedding" if xti else "embedding",
                         sampler_options=embedding.sampler_options(method, token, vectors, xti=xti))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train, and say where the embedding went."""
    from library.config.option_file import parse_with_config_file
    return train(parse_with_config_file(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
