"""``--debug_dataset`` without a training loop: the model and dataset options alone, and the run that shows
the dataset as training would see it (used by the entry scripts and the dataset bench)."""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path
from typing import Sequence

from library.option_groups import Options

logger = logging.getLogger(__name__)


def build_parser(script: str, *, support_dreambooth: bool, support_caption: bool,
                 support_caption_dropout: bool) -> argparse.ArgumentParser:
    """The options that work today: model, data loading and dataset groups."""
    from library.options import add_data_loading_arguments, add_dataset_group, add_model_arguments

    parser = argparse.ArgumentParser(prog=script, description=f"{script}: --debug_dataset with the model and "
                                                               "dataset options")
    add_model_arguments(parser)
    add_data_loading_arguments(parser)
    add_dataset_group(parser, support_dreambooth=support_dreambooth, support_caption=support_caption,
                      support_caption_dropout=support_caption_dropout)
    return parser


def debug_dataset(opts: Options, *, support_dreambooth: bool, support_caption: bool,
                  new_tokens: Sequence[str] = (), replacements: dict[str, str] | None = None) -> int:
    """Build the datasets from the options and run :func:`library.data.debug.run_debug_dataset`.

    ``new_tokens`` are added to the tokenizer first and ``replacements`` rewrite the captions, as Textual
    Inversion training does. The top level of a ``--debug_dataset`` run: reads the dataset options,
    --validation_split / --validation_seed, --seed, --v2, --tokenizer_cache_dir, --debug_dataset_dir and
    --output_dir."""
    from library.config import load_dataset_blueprint
    from library.data.dataset import build_dataset_group, check_cache_compatibility
    from library.data.debug import run_debug_dataset
    from library.models.tokenizer import load_tokenizer

    blueprint = load_dataset_blueprint(opts.data, opts.validation, opts.data.dataset_config, given=opts.given,
                                       support_dreambooth=support_dreambooth, support_finetuning=support_caption)
    check_cache_compatibility(blueprint, opts.data.latents_cached)
    seed = opts.training.seed if opts.training.seed is not None else random.randint(0, 2**31 - 1)
    tokenizer = load_tokenizer(opts.model.v2, opts.model.tokenizer_cache_dir)
    if new_tokens:
        from library.methods.textual_inversion import add_tokens

        add_tokens(tokenizer, list(new_tokens))
    group = build_dataset_group(blueprint, seed=seed, tokenizer=tokenizer, max_token_length=opts.data.max_token_length,
                                weighted_captions=opts.data.weighted_captions)
    if replacements is not None:
        group.replacements = replacements
    out = Path(opts.data.debug_dataset_dir or Path(opts.save.output_dir or ".") / "debug_dataset")
    run_debug_dataset(group, out)
    return 0
