"""The benchmark's files (model, images, prompts) and the real command line of every case.

The command lines start from bench/train_step.py's :func:`train_argv` (the project's bench command line
for each method) and change what the GPU matrix varies: LoRA dim 16 / alpha 8, batch 4, precision,
attention, optimizer, gradient checkpointing, ``--torch_compile``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu.cases import Case, Sizes
from bench.scaling import ENGINES
from bench.train_step import make_images, model_file, train_argv, write_metadata
from library.training.checkpoint import final_name, step_name

OUTPUT_NAME = "bench"
LORA_DIM, LORA_ALPHA, LORA_LR, FT_LR = 16, 8, 1e-4, 1e-5
VAE_BATCH_SIZE, CACHE_WORKERS = 4, 8


def set_flag(argv: list[str], flag: str, value: object = None) -> list[str]:
    """``argv`` with ``flag`` given once: its value replaced, or the flag appended; ``value`` None means
    a switch (no value)."""
    out = list(argv)
    if flag in out:
        index = out.index(flag)
        if value is not None:
            out[index + 1] = str(value)
        return out
    return out + ([flag] if value is None else [flag, str(value)])


def drop_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` (and its value, when the next word is not an option)."""
    if flag not in argv:
        return list(argv)
    index = argv.index(flag)
    end = index + 2 if index + 1 < len(argv) and not argv[index + 1].startswith("--") else index + 1
    return argv[:index] + argv[end:]


@dataclass(frozen=True)
class Workspace:
    """Where the benchmark's inputs live (under ``root``; nothing here is the user's)."""

    root: Path
    preset: str

    @property
    def model(self) -> Path:
        """The random-weight checkpoint (tools/make_tiny_model.py output)."""
        return self.root / "model" / f"{self.preset}.safetensors"

    @property
    def data(self) -> Path:
        """Parent of the ``1_bench`` folder of training images."""
        return self.root / "data"

    @property
    def latent_data(self) -> Path:
        """Parent of the ``1_cache`` folder of the latent-caching case."""
        return self.root / "latent_data"

    @property
    def prompts(self) -> Path:
        """The sample-prompt file of the sampling case."""
        return self.root / "prompts.txt"


def populate(ws: Workspace, sizes: Sizes, *, latents: bool) -> None:
    """Build the model once, and write the images, the fine-tuning metadata and the prompt file."""
    built = model_file(ws.preset, ws.model.parent)
    assert built == ws.model, (built, ws.model)
    if not (ws.data / "1_bench").is_dir():
        make_images(ws.data, sizes.resolution, count=sizes.images)
    write_metadata(ws.data)
    ws.prompts.write_text(f"a photo of a bench --w {sizes.resolution} --h {sizes.resolution} "
                          f"--s {sizes.sample_steps} --d 1\n", encoding="utf-8")
    if latents:
        from bench.latent_cache import generate

        generate(ws.latent_data / "1_cache", sizes.latent_images)


@dataclass(frozen=True)
class Run:
    """One training process of a case: which script, its argv, where it writes."""

    label: str
    script: str
    argv: list[str] = field(hash=False)
    output_dir: Path

    @property
    def result_file(self) -> Path:
        """The trained file the run ends with (``<output_dir>/bench.safetensors``)."""
        return self.output_dir / f"{final_name(OUTPUT_NAME)}.safetensors"


def training_argv(case: Case, sizes: Sizes, ws: Workspace, out: Path, *, steps: int, unet_only: bool) -> list[str]:
    """The command line of a LoRA (train_network.py) or fine-tuning (fine_tune.py) run of ``case``."""
    method = "ft" if case.kind == "ft" else "lora"
    argv = train_argv(method, ws.model, ws.data, out, sizes.resolution, steps)
    argv = set_flag(argv, "--train_batch_size", case.batch_size or sizes.batch_size)
    argv = set_flag(argv, "--output_name", OUTPUT_NAME)
    argv = set_flag(argv, "--mixed_precision", case.mixed_precision)
    argv = set_flag(argv, "--optimizer_type", case.optimizer)
    argv = set_flag(argv, "--xformers" if case.attention == "xformers" else "--sdpa")
    for wanted, flag in ((case.full_bf16, "--full_bf16"), (case.gradient_checkpointing, "--gradient_checkpointing"),
                         (case.torch_compile, "--torch_compile")):
        if wanted:
            argv = set_flag(argv, flag)
    argv += ENGINES[case.engine]  # --deepspeed --zero_stage N and the offload options
    if method == "ft":
        return set_flag(set_flag(argv, "--learning_rate", FT_LR), "--save_precision", "fp16")
    argv = set_flag(set_flag(argv, "--network_dim", LORA_DIM), "--network_alpha", LORA_ALPHA)
    argv = set_flag(argv, "--learning_rate", LORA_LR)
    return argv if unet_only else drop_flag(argv, "--network_train_unet_only")


def case_runs(case: Case, sizes: Sizes, ws: Workspace, out_root: Path, *, unet_only: bool) -> list[Run]:
    """The processes ``case`` runs, in order (two for ``resume``, one otherwise)."""
    out = out_root / case.name
    script = "fine_tune" if case.kind == "ft" else "train_network"
    if case.kind in ("lora", "ft"):
        return [Run("train", script, training_argv(case, sizes, ws, out, steps=sizes.steps, unet_only=unet_only), out)]
    if case.kind == "sampling":
        argv = training_argv(case, sizes, ws, out, steps=sizes.steps, unet_only=unet_only)
        argv = set_flag(set_flag(argv, "--sample_every_n_steps", sizes.sample_every), "--sample_prompts", ws.prompts)
        return [Run("train", script, argv, out)]
    if case.kind == "latents":
        argv = training_argv(case, sizes, ws, out, steps=1, unet_only=unet_only)
        argv = set_flag(argv, "--train_data_dir", ws.latent_data)
        argv = set_flag(set_flag(argv, "--enable_bucket"), "--vae_batch_size", VAE_BATCH_SIZE)
        argv = set_flag(set_flag(argv, "--min_bucket_reso", sizes.resolution // 2), "--max_bucket_reso",
                        sizes.resolution * 2)
        argv = set_flag(argv, "--bucket_reso_steps", max(8, min(64, sizes.resolution // 8)))
        return [Run("train", script, set_flag(argv, "--max_data_loader_n_workers", CACHE_WORKERS), out)]
    if case.kind == "resume":
        straight_out, resumed_out = out / "straight", out / "resumed"
        n, k = sizes.steps_resume, sizes.resume_at
        straight = training_argv(case, sizes, ws, straight_out, steps=n, unet_only=unet_only)
        straight = set_flag(set_flag(straight, "--save_every_n_steps", k), "--save_state")
        state = straight_out / f"{step_name(OUTPUT_NAME, k)}-state"
        resumed = set_flag(training_argv(case, sizes, ws, resumed_out, steps=n, unet_only=unet_only), "--resume", state)
        return [Run("straight", script, straight, straight_out), Run("resumed", script, resumed, resumed_out)]
    raise ValueError(case.kind)
