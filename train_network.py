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
    training_args.add_network_arguments(parser)
    from library.training.precision_options import add_no_half_vae_arguments
    add_no_half_vae_arguments(parser)  # --no_half_vae
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train, and say where the network went."""
    from library.config.option_file import parse_with_config_file
    args = parse_with_config_file(build_parser(), argv)
    from library.config.arguments import parse_network_args
    from library.methods.network import NetworkMethod, import_network_module, network_text_encoder, output_layout
    from library.methods.network_metadata import RunMetadata, model_hash_jobs, network_metadata
    from library.methods.network_base_weights import merge_base_weights_from_args
    from library.methods.network_extras import check_max_norm_support
    from library.models.fp8 import apply_fp8_storage, fp8_parts
    from library.models.save import precision_dtype
    from library.dataset_debug import debug_dataset
    from library.dry_run.report import run_dry_run
    from library.training import session
    from library.training.args import dry_run_requested, validate_training_args
    from library.training.sampling import sample_settings
    from library.errors import UserError
    import torch

    validate_training_args(args)
    if args.debug_dataset:
        return debug_dataset(args, support_dreambooth=True, support_caption=True)
    sampling = sample_settings(args)
    network_module = import_network_module(args.network_module)
    network_kwargs = parse_network_args(args.network_args)
    save_dtype = precision_dtype(args.save_precision)
    layout = output_layout(args.save_model_as)
    if dry_run_requested(args):  # report and exit before anything is loaded (docs/dry_run.md)
        return run_dry_run(args, "network", layout=layout, support_dreambooth=True, support_finetuning=True)
    run = session.prepare_run(args, "network_train", layout=layout, support_dreambooth=True, support_finetuning=True)
    accelerator, model, weight_dtype = run.accelerator, run.model, run.weight_dtype

    train_unet, train_te = not args.network_train_text_encoder_only, not args.network_train_unet_only
    unet, te = model.unet, model.text_encoder
    for module in (unet, te, model.vae):
        module.requires_grad_(False)
        module.eval()
    merge_base_weights_from_args(args, text_encoder=te, unet=unet, v2=model.v2)  # --base_weights
    te_view = network_text_encoder(args.network_module, te)  # kohya's lora_te_text_model_* names for LyCORIS
    if args.network_weights and args.dim_from_weights:
        network, _ = network_module.create_network_from_weights(1.0, args.network_weights, model.vae, te_view, unet,
                                                                **network_kwargs)
    else:
        network = network_module.create_network(1.0, args.network_dim, args.network_alpha, model.vae, te_view,
                                                unet, neuron_dropout=args.network_dropout, **network_kwargs)
    check_max_norm_support(network, args.network_module, args.scale_weight_norms)
    network.apply_to(te, unet, train_te, train_unet)
    if args.network_weights:
        try:
            network.load_weights(args.network_weights)
        except RuntimeError as exc:  # shape mismatches
            raise UserError(f"--network_weights {args.network_weights}: does not fit this network "
                            f"({str(exc).strip().splitlines()[-1][:200]}); try --dim_from_weights") from None
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        te.gradient_checkpointing_enable()
        unet.train()
        te.train()
        network.enable_gradient_checkpointing()
    session.place(unet, accelerator.device, weight_dtype)
    session.place(te, accelerator.device, torch.float32)
    session.place(model.vae, accelerator.device, run.vae_dtype)  # float32 with --no_half_vae
    apply_fp8_storage(fp8_parts(args.fp8_base, args.fp8_base_unet), unet, te, weight_dtype)  # --fp8_base(_unet)
    network.to(accelerator.device)
    if args.full_fp16 or args.full_bf16:  # trainable weights and their gradients in the half dtype
        network.to(dtype=weight_dtype)
    if hasattr(network, "prepare_grad_etc"):
        network.prepare_grad_etc(te, unet)

    method_kwargs = dict(model=model, network=network, train_unet=train_unet, train_text_encoder=train_te,
                         clip_skip=args.clip_skip, max_token_length=args.max_token_length,
                         weighted_captions=args.weighted_captions, save_format=args.save_model_as,
                         save_dtype=save_dtype, device=accelerator.device)
    method = NetworkMethod(text_encoder_lr=args.text_encoder_lr, unet_lr=args.unet_lr,
                           learning_rate=args.learning_rate, metadata=lambda *a: {},
                           max_norm=args.scale_weight_norms, **method_kwargs)

    def attach_metadata(trainer, plan, built):
        """The ss_* metadata of every saved file (needs the resumed session id and the optimizer)."""
        base = network_metadata(args, group=run.group, blueprint=run.blueprint, plan=plan, seed=run.seed,
                                session_id=trainer.progress.session_id, started_at=trainer.progress.started_at,
                                optimizer_name=built.description, v2=model.v2,
                                v_parameterization=model.v_parameterization,
                                recorded_lrs=session.recorded_learning_rates(args, built))
        method.metadata = RunMetadata(base, {} if args.no_metadata else model_hash_jobs(args), args.no_metadata)

    return session.train(args, run, method, sampling=sampling,
                         description=f"{args.network_module}, dim {args.network_dim}", result_name="network",
                         sampler_options=dict(extra_modules=[network]), before_start=attach_metadata)


if __name__ == "__main__":
    sys.exit(run_main(main))
