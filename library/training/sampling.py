"""Sample images during training (training_behaviour.md §13; docs/sampling.md).

The images come from the model *as it is being trained*: the live UNet (with any LoRA hooked into it),
text encoder (with trained weights or new Textual Inversion rows) and tokenizer, wrapped in a diffusers
``StableDiffusionPipeline`` for the denoising loop. Prompts are encoded here, not by the pipeline, with
the long-prompt-weighting routine of §8 (A1111 ``(word:1.2)`` syntax, up to 225 tokens), and handed to
it as ``prompt_embeds`` / ``negative_prompt_embeds``.

Sampling never changes training: the modules' train/eval flags, the torch (CPU and CUDA), Python and
NumPy RNG states and the VAE's device are put back afterwards, and the latent noise comes from a
``torch.Generator`` of its own. So a run with samples trains bit-identical weights to one without.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from library.data.tokens import encode_weighted_captions
from library.errors import UserError
from library.fileio import atomic_path
from library.option_groups import SampleOptions
from library.training.prompts import DEFAULT_SAMPLER, SAMPLER_NAMES, SamplePrompt, read_prompt_file

logger = logging.getLogger(__name__)

SAMPLE_MAX_TOKEN_LENGTH = 225  # the long-prompt pipeline's max_embeddings_multiples 3
PNDM_MIN_STEPS = 4  # PNDM's Runge-Kutta warm-up needs four timesteps
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# --sample_sampler name -> (diffusers scheduler class, extra constructor arguments)
SAMPLER_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
for _name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a"):
    SAMPLER_TABLE[f"k_{_name}"] = SAMPLER_TABLE[_name]


def build_sample_scheduler(name: str, v_parameterization: bool) -> Any:
    """A fresh diffusers scheduler for ``--sample_sampler name`` with the training noise schedule.

    ``steps_offset=1`` and ``clip_sample=False`` are set where the class has them: that is what
    ``StableDiffusionPipeline`` rewrites an SD scheduler config to anyway (the reference switches
    ``clip_sample`` to True, which the pipeline then switches back), and setting them here avoids its
    deprecation warnings. ``dpmsolver`` also needs ``final_sigmas_type="sigma_min"`` in current diffusers.
    """
    import diffusers

    if name not in SAMPLER_TABLE:
        raise UserError(f"--sample_sampler {name}: unknown; use one of {', '.join(SAMPLER_NAMES)}")
    class_name, extra = SAMPLER_TABLE[name]
    cls = getattr(diffusers, class_name)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = dict(NOISE_SCHEDULE, **extra)
    kwargs["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    if "steps_offset" in params:
        kwargs["steps_offset"] = 1
    if "clip_sample" in params:
        kwargs["clip_sample"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "dpmsolver" is deprecated upstream but documented here
        return cls(**kwargs)


def derived_seed(run_seed: int, step: int, line_index: int) -> int:
    """The seed of a prompt without ``--d``: a hash of (run seed, global step, prompt line).

    The reference continues the global torch RNG stream instead; a seed of its own keeps sampling
    reproducible and independent of training.
    """
    state = np.random.SeedSequence([int(run_seed) & 0xFFFFFFFF, int(step), int(line_index)]).generate_state(2)
    return (int(state[0]) << 32 | int(state[1])) & (2**63 - 1)


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleSettings:
    """When to sample and with what (from ``--sample_*``, validated by :func:`sample_settings`)."""

    prompts_file: Path
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    sampler: str = DEFAULT_SAMPLER
    at_first: bool = False

    def due(self, *, step: int, epoch: int | None = None, first: bool = False) -> bool:
        """Whether a sampling point is due: the start (``first``), an epoch end (``epoch`` given) or a step.

        Epoch cadence wins: with ``every_n_epochs`` set, steps never sample.
        """
        if first:
            return self.at_first
        if epoch is not None:
            return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0
        return not self.every_n_epochs and bool(self.every_n_steps) and step % self.every_n_steps == 0


def sample_settings(sample: SampleOptions) -> SampleSettings | None:
    """Validate the ``--sample_*`` options (``--sample_every_n_steps``, ``--sample_every_n_epochs``,
    ``--sample_at_first``, ``--sample_prompts``, ``--sample_sampler``) and the prompt file up front; None when no
    samples are asked for.

    Problems that the reference only meets at the first sampling point (no prompt file: TypeError; a
    missing file: a message) are UserErrors before any model is loaded here.
    """
    steps, epochs = sample.sample_every_n_steps, sample.sample_every_n_epochs
    at_first, prompts = sample.sample_at_first, sample.sample_prompts
    for option, value in (("--sample_every_n_steps", steps), ("--sample_every_n_epochs", epochs)):
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: must be at least 1")
    asked = [o for o, v in (("--sample_every_n_steps", steps), ("--sample_every_n_epochs", epochs),
                            ("--sample_at_first", at_first)) if v]
    if not asked:
        if prompts:
            logger.warning("--sample_prompts is given but no --sample_every_n_steps, --sample_every_n_epochs or "
                           "--sample_at_first: no samples will be made")
        return None
    if not prompts:
        raise UserError(f"{asked[0]} needs --sample_prompts (a text file with one prompt per line)")
    if steps and epochs:
        logger.warning("--sample_every_n_epochs is given, so --sample_every_n_steps is ignored")
        steps = None
    if not read_prompt_file(prompts):
        logger.warning("--sample_prompts %s holds no prompts: no samples will be made", prompts)
    return SampleSettings(prompts_file=Path(prompts), every_n_steps=steps, every_n_epochs=epochs,
                          sampler=sample.sample_sampler or DEFAULT_SAMPLER, at_first=at_first)


# --------------------------------------------------------------------------------------------------
# Generating one image
# --------------------------------------------------------------------------------------------------

@dataclass
class SampleComponents:
    """The live model parts that samples are made with (the very objects being trained)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    v_parameterization: bool = False
    clip_skip: int | None = None
    # longest prompt in tokens: 75, 150 or 225 (gen_img_diffusers.py's --max_embeddings_multiples × 75)
    max_token_length: int = SAMPLE_MAX_TOKEN_LENGTH
    # XTI: [prompt, negative] -> per-layer states (layers, 2, L, D), routed by ``cross_attention_kwargs``
    layer_encoder: Callable[[list[str]], torch.Tensor] | None = None


def encode_prompt_pair(components: SampleComponents, prompt: str,
                       negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning for a prompt and its negative: the weighted long-prompt path of §8, encoded as one
    batch so both get the same number of 77-token chunks (up to ``components.max_token_length``, by
    default three: 225 tokens). fp32, (1, 77·m, D).

    ``--clip_skip`` is applied (the reference ignores it here, a BUG fixed upstream): samples are
    conditioned the same way as training.
    """
    states = encode_weighted_captions(components.tokenizer, components.text_encoder, [prompt, negative_prompt],
                                      components.max_token_length, clip_skip=components.clip_skip)
    states = states.float()
    return states[:1], states[1:]


def _pipeline(components: SampleComponents, scheduler: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                       tokenizer=components.tokenizer, unet=components.unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_images(components: SampleComponents, prompt: SamplePrompt, *, sampler: str = DEFAULT_SAMPLER,
                    generators: Sequence[torch.Generator], output_type: str = "np",
                    embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[np.ndarray]:
    """``len(generators)`` images of ``prompt``, denoised as one batch, as float32 HWC in [0, 1]
    (``output_type="latent"``: the final latents, CHW, before decoding). Image i's initial latent and
    sampler noise come from ``generators[i]`` alone (a CPU generator gives the same image on any device).
    ``embeds``: the prompt's :func:`encode_prompt_pair` result when already encoded (gen_img_diffusers.py
    encodes each prompt once for all its batches); not with a ``layer_encoder`` (XTI)."""
    steps = prompt.steps
    if SAMPLER_TABLE.get(sampler, ("",))[0] == "PNDMScheduler" and steps < PNDM_MIN_STEPS:
        logger.warning("sample %d: pndm needs at least %d steps; using %d", prompt.line_index, PNDM_MIN_STEPS,
                       PNDM_MIN_STEPS)
        steps = PNDM_MIN_STEPS
    count = len(generators)
    extra = {}
    if components.layer_encoder is not None:
        layers = components.layer_encoder([prompt.prompt, prompt.negative_prompt]).float()
        positive, negative = layers[0, :1], layers[0, 1:]
        routed = torch.cat([layers[:, 1:], layers[:, :1]], dim=1) if prompt.scale > 1 else layers[:, :1]
        routed = routed.repeat_interleave(count, dim=1)
        extra["cross_attention_kwargs"] = {"xti_states": routed.to(components.unet.dtype)}
    else:
        positive, negative = embeds or encode_prompt_pair(components, prompt.prompt, prompt.negative_prompt)
    pipe = _pipeline(components, build_sample_scheduler(sampler, components.v_parameterization))
    device = next(components.unet.parameters()).device
    result = pipe(prompt_embeds=positive.to(device), negative_prompt_embeds=negative.to(device),
                  height=prompt.height, width=prompt.width, num_inference_steps=steps, num_images_per_prompt=count,
                  guidance_scale=prompt.scale, generator=generators[0] if count == 1 else list(generators),
                  output_type=output_type, **extra)
    return [(image.float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)).astype(np.float32)
            for image in result.images]


def generate_image(components: SampleComponents, prompt: SamplePrompt, *, sampler: str = DEFAULT_SAMPLER,
                   generator: torch.Generator, output_type: str = "np") -> np.ndarray:
    """One image for ``prompt`` (see :func:`generate_images`)."""
    return generate_images(components, prompt, sampler=sampler, generators=[generator], output_type=output_type)[0]


def with_prompt_transform(prompt: SamplePrompt, transform: Callable[[str], str] | None) -> SamplePrompt:
    """``prompt`` with ``transform`` applied to its prompt and negative prompt (Textual Inversion's token
    expansion); unchanged when ``transform`` is None."""
    if transform is None:
        return prompt
    return dataclasses.replace(prompt, prompt=transform(prompt.prompt),
                               negative_prompt=transform(prompt.negative_prompt))


def write_png(path: Path, image: np.ndarray, text: dict[str, str] | None = None) -> Path:
    """Write a uint8 HWC image as PNG atomically, with ``text`` as PNG text chunks; returns ``path``."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    return path


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float HWC in [0, 1] to uint8, rounded as diffusers' ``numpy_to_pil`` does (NaN becomes 0, with a
    warning: the model or the prompt's weights produced non-finite values)."""
    if not np.isfinite(image).all():
        logger.warning("a sample image holds NaN/inf values (diverged weights, or extreme prompt weights); "
                       "they are written as black")
        image = np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def sample_file_name(output_name: str | None, *, step: int, epoch: int | None, line_index: int,
                     seed: int | None, timestamp: str) -> str:
    """``[<output_name>_]<YYYYmmddHHMMSS>_<num>_<ii>[_<seed>].png`` (§13): ``<num>`` is ``e<epoch:06d>`` for
    epoch-end samples and ``<step:06d>`` otherwise; ``<ii>`` the two-digit 0-based line of the prompt file;
    ``_<seed>`` only for prompts with ``--d``."""
    num = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    suffix = f"_{seed}" if seed is not None else ""
    return f"{prefix}{timestamp}_{num}_{line_index:02d}{suffix}.png"


# --------------------------------------------------------------------------------------------------
# Leaving training exactly as it was
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Save torch (CPU and every CUDA device), Python and NumPy RNG states; restore them on exit."""
    cpu, py, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        random.setstate(py)
        np.random.set_state(np_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Put every module (recursively) into eval mode; restore each submodule's own flag on exit."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Move ``module`` to ``device`` for the duration (a VAE kept on the CPU with cached latents)."""
    param = next(module.parameters(), None)
    original = param.device if param is not None else device
    moved = torch.device(original) != torch.device(device)
    if moved:
        module.to(device)
    try:
        yield
    finally:
        if moved:
            module.to(original)


# --------------------------------------------------------------------------------------------------
# The sampler the training loop calls
# --------------------------------------------------------------------------------------------------

@dataclass
class Sampler:
    """Makes the sample images of a run at the points :class:`SampleSettings` says are due.

    ``extra_modules`` are trained modules outside the model parts (a LoRA network) to put in eval mode;
    ``prompt_transform`` rewrites prompts first (Textual Inversion expands a multi-vector token string).
    """

    settings: SampleSettings
    components: SampleComponents
    output_dir: Path
    run_seed: int
    output_name: str | None = None
    extra_modules: Sequence[torch.nn.Module] = ()
    prompt_transform: Callable[[str], str] | None = None
    #: set where the trained weights are sharded (ZeRO-3, FSDP2): runs a function on every process inside the
    #: sharded root's forward, whose hooks gather the weights; then every process generates, the main one writes
    together: Callable[[Callable[[], Any]], Any] | None = None

    @property
    def sample_dir(self) -> Path:
        """``<output_dir>/sample``."""
        return Path(self.output_dir) / "sample"

    def maybe_sample(self, accelerator: Any, *, step: int, epoch: int | None = None,
                     first: bool = False) -> list[Path]:
        """Sample if this point is due (see :meth:`SampleSettings.due`). Only the main process generates;
        every process waits for it, so all resume training together."""
        if not self.settings.due(step=step, epoch=epoch, first=first):
            return []
        if self.together is not None:  # sharded weights: every process takes part in every gather
            paths: list[Path] = []
            self.together(lambda: paths.extend(self.sample(accelerator, step=step, epoch=epoch, shared=True)))
        else:
            paths = self.sample(accelerator, step=step, epoch=epoch) if accelerator.is_main_process else []
        accelerator.wait_for_everyone()
        return paths

    def _prompts(self) -> list[SamplePrompt]:
        """The prompt file, read again at every sampling point so edits during training take effect."""
        try:
            return read_prompt_file(self.settings.prompts_file)
        except UserError as exc:  # it was valid at start: keep training, skip these samples
            logger.error("no samples this time: %s", exc)
            return []

    def _shared_prompts(self, accelerator: Any) -> list[SamplePrompt]:
        """The main process's prompts on every process (each generates the same images in step)."""
        prompts = [self._prompts() if accelerator.is_main_process else None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(prompts, src=0)
        return prompts[0] or []

    def sample(self, accelerator: Any, *, step: int, epoch: int | None = None, shared: bool = False) -> list[Path]:
        """Generate, save and log one image per prompt now; returns the written files. ``shared``: every
        process calls this with the main process's prompts; only the main process writes and logs."""
        prompts = self._shared_prompts(accelerator) if shared else self._prompts()
        if not prompts:
            return []
        write = accelerator.is_main_process
        parts = self.components
        device = accelerator.device
        paths = []
        if write:
            logger.info("generating %d sample image(s) at %s", len(prompts),
                        f"epoch {epoch}" if epoch is not None else f"step {step}")
        modules = [parts.unet, parts.text_encoder, parts.vae, *self.extra_modules]
        try:
            with preserved_rng_states(), eval_mode(modules), on_device(parts.vae, device), accelerator.autocast():
                for prompt in prompts:
                    path = self._one(accelerator, prompt, step=step, epoch=epoch, write=write)
                    paths += [path] if path is not None else []
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return paths

    def _one(self, accelerator: Any, prompt: SamplePrompt, *, step: int, epoch: int | None,
             write: bool = True) -> Path | None:
        prompt = with_prompt_transform(prompt, self.prompt_transform)
        seed = prompt.seed if prompt.seed is not None else derived_seed(self.run_seed, step, prompt.line_index)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        image = to_uint8(generate_image(self.components, prompt, sampler=self.settings.sampler, generator=generator))
        if not write:
            return None
        name = sample_file_name(self.output_name, step=step, epoch=epoch, line_index=prompt.line_index,
                                seed=prompt.seed, timestamp=time.strftime("%Y%m%d%H%M%S"))
        path = write_png(self.sample_dir / name, image)
        log_sample_image(accelerator, image, tag=f"sample_{prompt.line_index:02d}", step=step, caption=prompt.prompt)
        return path


def make_sampler(settings: SampleSettings | None, *, output_dir: str | Path, clip_skip: int | None, unet: Any,
                 vae: Any, text_encoder: Any, tokenizer: Any, v_parameterization: bool, seed: int,
                 output_name: str | None, extra_modules: Sequence[torch.nn.Module] = (),
                 prompt_transform: Callable[[str], str] | None = None,
                 layer_encoder: Callable[[list[str]], torch.Tensor] | None = None) -> Sampler | None:
    """The :class:`Sampler` an entry script hands to the Trainer (None without samples): the live model
    parts, ``output_dir`` (``--output_dir``) and ``clip_skip`` (``--clip_skip``), the run seed and
    ``output_name``, the stem of the run's saves (``--output_name``, or the method's default), which begins the
    image names."""
    if settings is None:
        return None
    parts = SampleComponents(unet, vae, text_encoder, tokenizer, v_parameterization,
                             clip_skip=clip_skip, layer_encoder=layer_encoder)
    return Sampler(settings=settings, components=parts, output_dir=Path(output_dir), run_seed=seed,
                   output_name=output_name, extra_modules=list(extra_modules),
                   prompt_transform=prompt_transform)


def log_sample_image(accelerator: Any, image: np.ndarray, *, tag: str, step: int, caption: str = "") -> None:
    """Send a uint8 HWC image to the run's TensorBoard (``add_image``) and W&B trackers, if any."""
    for tracker in getattr(accelerator, "trackers", None) or []:
        name = getattr(tracker, "name", "")
        if name == "tensorboard" and getattr(tracker, "writer", None) is not None:
            tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(image, caption=caption)})
