"""Generate images with a Stable Diffusion 1.x/2.x model and trained LoRA networks / embeddings.

    python gen_img_diffusers.py --ckpt model.safetensors --outdir out --prompt "a dog --n cat --d 1" \\
        --network_module networks.lora --network_weights my_lora.safetensors --network_mul 0.8

Uses the sampler of training (library/training/sampling.py), so an image equals the training sample made
with the same seed and settings. See docs/gen_img.md for every option.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from library.cli import run_main
from library.training.prompts import DEFAULT_SAMPLER, SAMPLER_NAMES


def build_parser() -> argparse.ArgumentParser:
    """All options of gen_img_diffusers.py (kohya names)."""
    p = argparse.ArgumentParser(prog="gen_img_diffusers.py", description=__doc__.strip().splitlines()[0])
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", "--pretrained_model_name_or_path", dest="ckpt", default=None,
                   help="base model: ldm .ckpt/.safetensors file or local diffusers folder")
    g.add_argument("--v2", action="store_true", help="the model is SD 2.x (also detected from the weights)")
    g.add_argument("--v_parameterization", action="store_true",
                   help="v-prediction model (SD2 768-v); as in training, without it epsilon is used")
    g.add_argument("--vae", default=None, help="replacement VAE: diffusers folder, VAE-only or full ldm file")
    g.add_argument("--tokenizer_cache_dir", default=None, help="folder for an offline copy of the tokenizer")
    g = p.add_argument_group("prompts and output")
    g.add_argument("--outdir", default=None, help="folder for the PNGs (created; existing files are kept)")
    g.add_argument("--prompt", default=None,
                   help="one prompt; may carry the prompt-file options --n --w --h --d --l --s")
    g.add_argument("--from_file", default=None,
                   help="prompt file: one prompt per line with options --n --w --h --d --l --s (docs/sampling.md)")
    g.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt, seeds seed, seed+1, ...")
    g.add_argument("--batch_size", type=int, default=1, help="images of one prompt denoised together (default 1)")
    g = p.add_argument_group("sampling (defaults for prompts that do not set them)")
    g.add_argument("--steps", type=int, default=50, help="denoising steps (default 50; a line's --s wins)")
    g.add_argument("--sampler", default=DEFAULT_SAMPLER,
                   help=f"scheduler, as --sample_sampler in training: {', '.join(SAMPLER_NAMES)} (default ddim)")
    g.add_argument("--W", type=int, default=512, help="width, a multiple of 8 (default 512; a line's --w wins)")
    g.add_argument("--H", type=int, default=512, help="height, a multiple of 8 (default 512; a line's --h wins)")
    g.add_argument("--scale", type=float, default=7.5, help="guidance (CFG) scale (default 7.5; a line's --l wins)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of each prompt's first image (a line's --d wins); random when not given")
    g.add_argument("--clip_skip", type=int, default=None, help="use the output of the n-th last text-encoder layer")
    g.add_argument("--max_embeddings_multiples", type=int, default=3,
                   help="prompt length limit in 75-token chunks: 1, 2 or 3 (default 3, as training samples)")
    g = p.add_argument_group("networks and embeddings")
    g.add_argument("--network_module", nargs="+", action="extend", default=None,
                   help="network module of each --network_weights file, e.g. networks.lora")
    g.add_argument("--network_weights", nargs="+", action="extend", default=None,
                   help="LoRA files (several at once are all applied)")
    g.add_argument("--network_mul", nargs="+", action="extend", type=float, default=None,
                   help="multiplier of each network (default 1.0 each; 0 turns one off)")
    g.add_argument("--textual_inversion_embeddings", nargs="+", action="extend", default=None,
                   help="embedding files (.safetensors/.pt/.bin, kohya or A1111 layout); the file name is the token")
    g = p.add_argument_group("precision and attention")
    g.add_argument("--fp16", action="store_true", help="UNet and VAE in float16 (text encoder stays float32)")
    g.add_argument("--bf16", action="store_true", help="UNet and VAE in bfloat16 (text encoder stays float32)")
    g.add_argument("--xformers", action="store_true", help="xformers attention on a GPU (no effect on the CPU)")
    g.add_argument("--sdpa", action="store_true",
                   help="PyTorch scaled-dot-product attention: the default anyway (no effect on the CPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, generate every image and say where they went."""
    from library.generation_options import GenerationOptions

    opts = GenerationOptions.from_args(build_parser().parse_args(argv))  # the one typed group, built once
    from library.generation import generate

    written = generate(opts)
    print(f"wrote {len(written)} image(s) to {opts.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
