"""Command-line option groups shared by the training scripts (kohya flag names and defaults).

Each ``add_*`` function registers one group; scripts pick the groups they support. The training-loop
options arrive with the training loop; what is here is what model loading and the datasets read.
"""

from __future__ import annotations

import argparse

from library.config import add_config_arguments, add_dataset_arguments


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model options: --pretrained_model_name_or_path, --v2, --v_parameterization, --tokenizer_cache_dir, --vae."""
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="base model: ldm .ckpt/.safetensors file, diffusers folder, or Hugging Face Hub id")
    g.add_argument("--v2", action="store_true", help="the base model is Stable Diffusion 2.x (checked against the weights)")
    g.add_argument("--v_parameterization", action="store_true", help="train with the v-prediction target (SD2 768-v)")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder for an offline copy of the tokenizer (used if present, written if absent)")
    g.add_argument("--vae", type=str, default=None,
                   help="replacement VAE: diffusers folder / Hub id, VAE-only or full ldm checkpoint")


def add_data_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """Options the dataset reads that kohya files under the training group."""
    g = parser.add_argument_group("data loading")
    g.add_argument("--output_dir", type=str, default=None, help="folder for outputs (models, samples, previews)")
    g.add_argument("--seed", type=int, default=None, help="random seed (batch order, augmentation, noise)")
    g.add_argument("--train_batch_size", type=int, default=1, help="batch size (default 1)")
    g.add_argument("--max_token_length", type=int, default=None, choices=[None, 75, 150, 225],
                   help="caption token budget: 75 (default), 150 or 225")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")
    g.add_argument("--weighted_captions", action="store_true", help="parse (word:1.2) / [word] weights in captions")
    g.add_argument("--max_data_loader_n_workers", type=int, default=8,
                   help="DataLoader worker processes (at most the CPU count; default 8)")
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep DataLoader workers between epochs")
    g.add_argument("--debug_dataset_dir", type=str, default=None,
                   help="where --debug_dataset writes contact sheets (default <output_dir or .>/debug_dataset)")


def add_dataset_group(parser: argparse.ArgumentParser, *, support_dreambooth: bool, support_caption: bool,
                      support_caption_dropout: bool) -> None:
    """The dataset options (``library.config``) plus --dataset_config."""
    add_dataset_arguments(parser, support_dreambooth=support_dreambooth, support_caption=support_caption,
                          support_caption_dropout=support_caption_dropout)
    add_config_arguments(parser)
