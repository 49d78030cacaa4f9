"""Train a LoRA-family network (networks.lora, networks.dylora, ...) on a Stable Diffusion 1.x/2.x model.

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \\
        --dataset_config data.toml --output_dir out --network_module networks.lora --network_dim 8 ...

See docs/train_network.md for every option.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from library.cli import run_main


def build_parser() -> argparse.ArgumentParser:
    """All options of train_network.py (kohya names)."""
    from library.training import args as training_args

    parser = training_args.build_training_parser(
        "train_network.py", __doc__.strip().splitlines()[0], support_dreambooth=True, support_caption=True,
        support_caption_dropout=True)
    training_args.add_saving_arguments(parser, model_formats=("safetensors", "ckpt", "pt"),
                                       default_format="safetensors")
    from library.training.network_options import add_network_arguments
    add_network_arguments(parser)
    from library.training.precision_options import add_no_half_vae_arguments
    add_no_half_vae_arguments(parser)  # --no_half_vae
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train, and say where the network went."""
    from library.config.option_file import parse_with_config_file
    args = parse_with_config_file(build_parser(), argv)
    from library.methods import network as method
    from library.run_start import ScriptSupport, start_run
    from library.training import session

    started = start_run(args, ScriptSupport("network_train", dreambooth=True, captions=True),
                                method.method_start)
    if isinstance(started, int):  # --debug_dataset, --dry_run
        return started
    opts, run = started.opts, started.run
    network = method.prepare_network(run.model, opts.network, opts.model, device=run.accelerator.device,
                                     weight_dtype=run.weight_dtype, vae_dtype=run.vae_dtype,
                                     full_half=opts.training.full_half)
    train_unet, train_te = method.trained_parts(opts.network)
    trained = method.NetworkMethod(
        model=run.model, network=network, train_unet=train_unet, train_text_encoder=train_te,
        text_encoder_lr=opts.network.text_encoder_lr, unet_lr=opts.network.unet_lr,
        learning_rate=opts.optimizer.learning_rate, clip_skip=opts.model.clip_skip,
        max_token_length=opts.data.max_token_length, weighted_captions=opts.data.weighted_captions,
        save_format=opts.save.save_model_as, save_dtype=started.save_dtype, device=run.accelerator.device,
        record=method.NetworkRunRecord(opts, run=run), max_norm=opts.network.scale_weight_norms)
    return session.train(started, trained, description=f"{opts.network.network_module}, dim {opts.network.network_dim}",
                         result_name="network", sampler_options=dict(extra_modules=[network]))


if __name__ == "__main__":
    sys.exit(run_main(main))
