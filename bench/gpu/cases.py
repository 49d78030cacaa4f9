"""The case matrix of the GPU benchmark, the sizes of a full and a CPU-smoke run, and which cases can run.

A case is one training configuration (or one of the special measurements: sampling, latent caching,
exact resume). :data:`MATRIX` lists them in priority order: when the time budget runs out, the cases
at the end are the ones left out.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from library.errors import UserError

KINDS = ("lora", "ft", "sampling", "latents", "resume")


@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    ``kind``: ``lora`` (train_network.py), ``ft`` (fine_tune.py, whole UNet), ``sampling`` (LoRA with
    sample images every few steps), ``latents`` (latent caching of many images), ``resume`` (N steps
    straight vs k steps + ``--resume`` to N).
    """

    name: str
    kind: str
    mixed_precision: str = "bf16"
    full_bf16: bool = False
    attention: str = "sdpa"
    optimizer: str = "AdamW"
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    batch_size: int | None = None  # None: the run's batch size (4)
    deterministic: bool = False
    engine: str = "ddp"  # bench/scaling.py ENGINES: ddp (none), zero2-offload, zero3-offload, ...
    note: str = ""

    def settings(self) -> dict[str, Any]:
        """The case's fields as a plain dict (for the results json)."""
        return dataclasses.asdict(self)


MATRIX: tuple[Case, ...] = (
    Case("lora-bf16", "lora", note="baseline: bf16 autocast, SDPA, AdamW"),
    Case("lora-fp16", "lora", mixed_precision="fp16"),
    Case("ft-bf16", "ft", note="whole UNet, bf16 autocast, fp32 AdamW; MFU"),
    Case("lora-b1-gc", "lora", mixed_precision="fp16", gradient_checkpointing=True, batch_size=1,
         note="the low-VRAM setting: target <= 6 GiB"),
    Case("lora-xformers", "lora", attention="xformers"),
    Case("lora-adamw8bit", "lora", optimizer="AdamW8bit"),
    Case("lora-gc", "lora", gradient_checkpointing=True),
    Case("lora-full-bf16", "lora", full_bf16=True),
    Case("lora-compile", "lora", torch_compile=True),
    Case("sampling", "sampling", note="LoRA bf16 with sample images every few steps: peak VRAM per round"),
    Case("latents-256", "latents", note="--cache_latents of photo-like JPEGs (512-1024 px), bucketed"),
    Case("resume", "resume", note="N steps straight vs k steps + --resume to N"),
    Case("resume-deterministic", "resume", deterministic=True,
         note="the same with torch.use_deterministic_algorithms and CUBLAS_WORKSPACE_CONFIG"),
    Case("ft-full-bf16", "ft", full_bf16=True, note="whole UNet with --full_bf16 (bf16 weights and AdamW states)"),
    Case("ft-zero2-offload", "ft", engine="zero2-offload",
         note="--deepspeed ZeRO-2, optimizer state and step on the CPU (DeepSpeedCPUAdam): peak VRAM vs ft-bf16"),
    Case("ft-zero3-offload-gc", "ft", engine="zero3-offload", gradient_checkpointing=True,
         note="--deepspeed ZeRO-3, weights and optimizer on the CPU, checkpointing: the under-12-GB target"),
)


@dataclass(frozen=True)
class Sizes:
    """How big a run is: model preset, resolution, steps, images."""

    preset: str
    resolution: int
    batch_size: int
    steps: int             # optimizer steps of a timed training case
    warmup: int            # first steps left out of the timing
    images: int            # training images of the LoRA / fine-tuning cases
    latent_images: int     # images of the latent-caching case
    sample_every: int      # --sample_every_n_steps of the sampling case
    sample_steps: int      # denoising steps of each sample image
    resume_at: int         # k of the resume case (N is ``steps_resume``)
    steps_resume: int


FULL = Sizes(preset="sd1", resolution=512, batch_size=4, steps=24, warmup=4, images=16, latent_images=256,
             sample_every=6, sample_steps=10, resume_at=4, steps_resume=8)
SMOKE = Sizes(preset="tiny-sd1", resolution=64, batch_size=4, steps=2, warmup=0, images=4, latent_images=8,
              sample_every=1, sample_steps=2, resume_at=1, steps_resume=2)


def sizes_for(cpu_smoke: bool, steps: int | None = None) -> Sizes:
    """The full-size run, or the CPU smoke run (tiny model, 1-2 steps); ``steps`` overrides the step count."""
    base = SMOKE if cpu_smoke else FULL
    if steps is None:
        return base
    if steps < 1:
        raise UserError(f"--steps {steps}: must be at least 1")
    warmup = min(base.warmup, max(0, steps - 2))
    return dataclasses.replace(base, steps=steps, warmup=warmup,
                               sample_every=max(1, min(base.sample_every, steps // 2 or 1)))


def select_cases(spec: str) -> list[Case]:
    """The cases named by ``spec``: comma-separated names, kinds (``lora``, ``ft``, ...), shell patterns
    (``lora-*``) or ``all``; in matrix order, each once."""
    chosen: list[Case] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        if word == "all":
            hits = list(MATRIX)
        else:
            hits = [c for c in MATRIX if c.kind == word or fnmatch.fnmatchcase(c.name, word)]
        if not hits:
            names = ", ".join(c.name for c in MATRIX)
            raise UserError(f"--cases {word}: no such case; use all, a kind ({', '.join(KINDS)}), "
                            f"a pattern such as lora-*, or names among {names}")
        chosen += [c for c in hits if c not in chosen]
    if not chosen:
        raise UserError("--cases: empty; name at least one case or all")
    return sorted(chosen, key=MATRIX.index)


CUDA_ONLY = "CUDA-only case (--cpu_smoke runs on the CPU)"


def skip_reason(case: Case, env: dict[str, Any], *, cpu_smoke: bool) -> str | None:
    """Why ``case`` cannot run with the probed environment ``env`` (see probes.probe_environment), or None.

    ``env`` keys: ``cuda`` (bool), ``bf16`` (bool), ``xformers`` / ``bitsandbytes`` / ``deepspeed`` ("ok" or
    why not), ``torch_compile`` ("ok" or why not)."""
    cuda = bool(env.get("cuda")) and not cpu_smoke
    if case.engine != "ddp" and env.get("deepspeed") != "ok":
        return f"deepspeed not available: {env.get('deepspeed')}"
    if case.torch_compile and env.get("torch_compile") != "ok":
        return f"option not available: {env.get('torch_compile')}"
    if case.torch_compile and not cuda:  # inductor is refused on the CPU (wrong gradients there)
        return CUDA_ONLY if cpu_smoke else "--torch_compile with inductor needs CUDA"
    if case.mixed_precision == "fp16" and not cuda:
        return CUDA_ONLY if cpu_smoke else "fp16 mixed precision needs CUDA (the trainer refuses it on the CPU)"
    if case.mixed_precision == "bf16" and not env.get("bf16"):
        return "bf16 is not supported on this device"
    if case.attention == "xformers":
        if not cuda:
            return CUDA_ONLY if cpu_smoke else "xformers needs CUDA"
        if env.get("xformers") != "ok":
            return f"xformers not available: {env.get('xformers')}"
    if case.optimizer == "AdamW8bit":
        if not cuda:
            return CUDA_ONLY if cpu_smoke else "AdamW8bit (bitsandbytes) needs CUDA here"
        if env.get("bitsandbytes") != "ok":
            return f"bitsandbytes not available: {env.get('bitsandbytes')}"
    return None
