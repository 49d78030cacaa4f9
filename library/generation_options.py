"""gen_img_diffusers.py's options as one frozen, typed group, and their checks (docs/gen_img.md).

The script parses its command line and builds :class:`GenerationOptions` once
(``GenerationOptions.from_args(args)``); everything in :mod:`library.generation` takes the group, never the
argparse Namespace. :func:`generation_problems` lists what is wrong with the options before anything is
loaded; :func:`check_generation_options` turns them into one UserError line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.option_groups import OptionGroup
from library.training.prompts import DEFAULT_SAMPLER, MAX_SEED, MAX_STEPS, MIN_SIZE, SAMPLER_NAMES, SIZE_MULTIPLE

MAX_EMBEDDINGS_MULTIPLES = 3  # the long-prompt encoder takes up to three 75-token chunks
CHUNK_TOKENS = 75  # tokens of one chunk of the long-prompt encoder


@dataclass(frozen=True)
class GenerationOptions(OptionGroup):
    """Every option of gen_img_diffusers.py, by its kohya name (several-valued options become tuples)."""

    # model
    ckpt: str | None = None
    v2: bool = False
    v_parameterization: bool = False
    vae: str | None = None
    tokenizer_cache_dir: str | None = None
    # prompts and output
    outdir: str | None = None
    prompt: str | None = None
    from_file: str | None = None
    images_per_prompt: int = 1
    batch_size: int = 1
    # sampling (defaults for prompt lines that do not set them)
    steps: int = 50
    sampler: str = DEFAULT_SAMPLER
    W: int = 512
    H: int = 512
    scale: float = 7.5
    seed: int | None = None
    clip_skip: int | None = None
    max_embeddings_multiples: int = 3
    # networks and embeddings
    network_module: tuple[str, ...] | None = None
    network_weights: tuple[str, ...] | None = None
    network_mul: tuple[float, ...] | None = None
    textual_inversion_embeddings: tuple[str, ...] | None = None
    # precision and attention
    fp16: bool = False
    bf16: bool = False
    xformers: bool = False
    sdpa: bool = False

    @property
    def prompt_defaults(self) -> dict[str, Any]:
        """The per-prompt values a prompt line may override (``--W --H --steps --scale --seed``)."""
        return dict(width=self.W, height=self.H, steps=self.steps, scale=self.scale, seed=self.seed)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the UNet and VAE: float16 with ``--fp16``, bfloat16 with ``--bf16``, else float32."""
        return torch.float16 if self.fp16 else torch.bfloat16 if self.bf16 else torch.float32

    @property
    def max_token_length(self) -> int:
        """The longest prompt in tokens: ``--max_embeddings_multiples`` × 75."""
        return CHUNK_TOKENS * self.max_embeddings_multiples

    @property
    def embedding_files(self) -> tuple[str, ...]:
        """``--textual_inversion_embeddings`` (empty when not given)."""
        return self.textual_inversion_embeddings or ()


def _size_problem(option: str, value: int) -> str | None:
    if value < MIN_SIZE or value % SIZE_MULTIPLE:
        return f"{option} {value}: must be a multiple of {SIZE_MULTIPLE} of at least {MIN_SIZE} pixels"
    return None


def _xformers_missing() -> bool:
    """True where ``--xformers`` would take effect (a GPU) but the package is not installed."""
    if not torch.cuda.is_available():
        return False
    import importlib.util

    return importlib.util.find_spec("xformers") is None


def generation_problems(opts: GenerationOptions) -> list[str]:
    """Every problem of the image options (reads all of them but the network options, which
    :func:`library.generation.network_specs` checks), in a fixed order; empty when they are fine."""
    problems: list[str | None] = []
    if not opts.ckpt:
        problems.append("--ckpt is required (an ldm .ckpt/.safetensors file or a diffusers folder)")
    if not opts.outdir:
        problems.append("--outdir is required (the folder the images are written to)")
    if bool(opts.prompt) == bool(opts.from_file):
        problems.append("give either --prompt \"<text>\" or --from_file <prompts.txt> (one of them)")
    if opts.xformers and _xformers_missing():
        problems.append("--xformers needs the package 'xformers' (pip install xformers); leave the option out "
                        "to use PyTorch's scaled-dot-product attention")
    if opts.sampler not in SAMPLER_NAMES:
        problems.append(f"--sampler {opts.sampler}: unknown; use one of {', '.join(SAMPLER_NAMES)}")
    problems += [_size_problem("--W", opts.W), _size_problem("--H", opts.H)]
    if not 1 <= opts.steps <= MAX_STEPS:
        problems.append(f"--steps {opts.steps}: must be between 1 and {MAX_STEPS}")
    if not math.isfinite(opts.scale):
        problems.append(f"--scale {opts.scale}: must be a finite number")
    if opts.seed is not None and not 0 <= opts.seed <= MAX_SEED:
        problems.append(f"--seed {opts.seed}: must be between 0 and 2**64-1")
    for option, value in (("--images_per_prompt", opts.images_per_prompt), ("--batch_size", opts.batch_size)):
        if value < 1:
            problems.append(f"{option} {value}: must be at least 1")
    if not 1 <= opts.max_embeddings_multiples <= MAX_EMBEDDINGS_MULTIPLES:
        problems.append(f"--max_embeddings_multiples {opts.max_embeddings_multiples}: must be 1, 2 or 3 "
                        "(prompts of up to 75, 150 or 225 tokens)")
    if opts.clip_skip is not None and opts.clip_skip < 1:
        problems.append(f"--clip_skip {opts.clip_skip}: must be 1 or more")
    if opts.fp16 and opts.bf16:
        problems.append("--fp16 and --bf16: give at most one")
    problems += [f"--textual_inversion_embeddings {path}: no such file" for path in opts.embedding_files
                 if not Path(path).is_file()]
    if opts.ckpt and not Path(opts.ckpt).exists():
        problems.append(f"--ckpt {opts.ckpt}: no such file or folder")
    return [p for p in problems if p]


def check_generation_options(opts: GenerationOptions) -> None:
    """Raise one UserError listing every problem of :func:`generation_problems` (nothing when fine)."""
    problems = generation_problems(opts)
    if problems:
        raise UserError("; ".join(problems))
