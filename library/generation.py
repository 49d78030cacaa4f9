"""Image generation with trained LoRA networks and Textual Inversion embeddings (gen_img_diffusers.py).

Built on the sampler that training uses (library/training/sampling.py): the same prompt-line syntax,
prompt encoding (A1111 weights, long prompts, ``--clip_skip``), schedulers, CPU noise generators and PNG
rounding. LoRA networks are hooked into the model exactly as in training (``create_network_from_weights``
+ ``apply_to``), embeddings are added as new token rows as in Textual Inversion training, and the text
encoder stays in float32 while the UNet and VAE take ``--fp16`` / ``--bf16``, as in a mixed-precision run.
So an image made here equals the sample made during training for the same seed and settings.

The functions take the script's option group (:class:`library.generation_options.GenerationOptions`) or
plain values. Everything the user gives is checked
(:func:`library.generation_options.check_generation_options`, :func:`network_specs`, :func:`read_prompts`)
before the model is loaded. Each distinct prompt (with its negative prompt) is encoded once
(:class:`PromptEncodings`) and reused for all of its batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from library.errors import UserError
from library.generation_options import GenerationOptions, check_generation_options
from library.training.prompts import MAX_SEED, SamplePrompt, parse_prompt_line, read_prompt_file

logger = logging.getLogger(__name__)

FILE_NAME = re.compile(r"^(\d{6,})_\d+\.png$")
PROMPT_CACHE_SIZE = 16  # encoded (prompt, negative prompt) pairs kept for reuse


@dataclass(frozen=True)
class NetworkSpec:
    """One ``--network_module`` / ``--network_weights`` / ``--network_mul`` triple."""

    module: str
    weights: Path
    multiplier: float


# --------------------------------------------------------------------------------------------------
# Checking the options (before anything is loaded)
# --------------------------------------------------------------------------------------------------

def network_specs(modules: Sequence[str] | None, weights: Sequence[str] | None,
                  multipliers: Sequence[float] | None) -> list[NetworkSpec]:
    """Pair the network options index by index; counts must match (``--network_mul`` may be left out:
    1.0 each) and every weights file must exist."""
    modules, weights, multipliers = list(modules or []), list(weights or []), list(multipliers or [])
    if len(modules) != len(weights):
        raise UserError(f"--network_module is given {len(modules)} time(s) but --network_weights {len(weights)}: "
                        "give one module per weights file, in the same order")
    if multipliers and len(multipliers) != len(weights):
        raise UserError(f"--network_mul has {len(multipliers)} value(s) for {len(weights)} network(s): give one "
                        "multiplier per --network_weights file, or none (1.0 each)")
    for path in weights:
        if not Path(path).is_file():
            raise UserError(f"--network_weights {path}: no such file")
    for value in multipliers:
        if not math.isfinite(value):
            raise UserError(f"--network_mul {value}: must be a finite number")
    return [NetworkSpec(m, Path(w), multipliers[i] if multipliers else 1.0)
            for i, (m, w) in enumerate(zip(modules, weights))]


def read_prompts(opts: GenerationOptions) -> list[SamplePrompt]:
    """The prompts of ``--from_file`` or ``--prompt`` (each may carry ``--n --w --h --d --l --s``; the
    others come from ``--W --H --steps --scale --seed``)."""
    defaults = opts.prompt_defaults
    if opts.from_file:
        prompts = read_prompt_file(opts.from_file, option="--from_file", defaults=defaults)
        if not prompts:
            raise UserError(f"--from_file {opts.from_file}: holds no prompts (blank and # lines are skipped)")
        return prompts
    prompt = parse_prompt_line(opts.prompt, 0, None, option="--prompt", defaults=defaults)
    if prompt is None:
        raise UserError("--prompt: is empty")
    return [prompt]


# --------------------------------------------------------------------------------------------------
# The model, its networks and embeddings
# --------------------------------------------------------------------------------------------------

def set_attention(unet: Any, device: torch.device, *, xformers: bool, sdpa: bool) -> None:
    """``--xformers`` on a GPU; PyTorch SDPA (diffusers' default, ``--sdpa``) otherwise. On the CPU both
    flags change nothing."""
    if device.type == "cpu":
        if xformers or sdpa:
            logger.info("--xformers / --sdpa have no effect on the CPU (PyTorch attention is used)")
        return
    if xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as exc:
            raise UserError(f"--xformers: cannot use xformers ({str(exc).splitlines()[0][:160]}); "
                            "install it or leave the option out") from None


def apply_networks(model: Any, specs: Sequence[NetworkSpec], device: torch.device) -> list[Any]:
    """Hook every network into the model's text encoder and UNet, as training does, at its multiplier.
    A file that does not fit the model (no matching layer, other shapes) is a UserError."""
    from library.methods.network import import_network_module

    networks = []
    for spec in specs:
        module = import_network_module(spec.module)
        where = f"--network_weights {spec.weights}"
        if not hasattr(module, "create_network_from_weights"):
            raise UserError(f"--network_module {spec.module}: the module has no create_network_from_weights()")
        network, weights = module.create_network_from_weights(spec.multiplier, str(spec.weights), model.vae,
                                                              model.text_encoder, model.unet, for_inference=True)
        network.apply_to(model.text_encoder, model.unet)
        try:
            info = network.load_state_dict(weights, strict=False)
        except RuntimeError as exc:
            raise UserError(f"{where}: does not fit this model ({str(exc).strip().splitlines()[-1][:200]})") from None
        if len(info.unexpected_keys) == len(weights):
            raise UserError(f"{where}: none of its modules matches a layer of this model (an SD1 network on an "
                            f"SD2 model, or not a {spec.module} file?)")
        if info.unexpected_keys:
            logger.warning("%s: %d of its tensors match no layer of this model, e.g. %s", where,
                           len(info.unexpected_keys), info.unexpected_keys[0])
        network.requires_grad_(False)
        network.to(device)
        network.eval()
        logger.info("applied %s (%s) with multiplier %g", spec.weights, spec.module, spec.multiplier)
        networks.append(network)
    return networks


def load_embeddings(model: Any, paths: Sequence[str]) -> Callable[[str], str] | None:
    """Add each embedding file's vectors as new tokens named after the file (``name``, ``name1``, …; A1111
    and kohya layouts) and return the prompt rewriter that expands ``name`` to all of its tokens."""
    from library.methods.textual_inversion import add_token_rows, expand_prompt, read_embedding_file
    from library.methods.textual_inversion import token_embedding, token_strings

    transforms = []
    for path in paths:
        name = Path(path).stem
        try:
            vectors = read_embedding_file(path)
        except UserError as exc:
            raise UserError(f"--textual_inversion_embeddings {path}: {str(exc).partition(': ')[2]}") from None
        width = token_embedding(model.text_encoder).embedding_dim
        if vectors.shape[1] != width:
            raise UserError(f"--textual_inversion_embeddings {path}: vectors of size {vectors.shape[1]}, but this "
                            f"model's text encoder uses {width} (SD1 768, SD2 1024)")
        try:
            ids = add_token_rows(model, model.tokenizer, token_strings(name, vectors.shape[0]))
        except UserError as exc:
            raise UserError(f"--textual_inversion_embeddings {path}: cannot add the token {name!r} (the file "
                            f"name; rename the file to a made-up word): {exc}") from None
        embedding = token_embedding(model.text_encoder)
        with torch.no_grad():
            embedding.weight[ids[0]:ids[0] + len(ids)] = vectors.to(embedding.weight.dtype)
        logger.info("embedding %s: token %r, %d vector(s)", path, name, len(ids))
        transforms.append(expand_prompt(name, len(ids)))
    if not transforms:
        return None

    def transform(prompt: str) -> str:
        for one in transforms:
            prompt = one(prompt)
        return prompt

    return transform


# --------------------------------------------------------------------------------------------------
# Seeds, names and metadata
# --------------------------------------------------------------------------------------------------

def image_seeds(seed: int | None, count: int) -> list[int]:
    """The seeds of a prompt's ``count`` images: ``seed``, ``seed+1``, … (a random start without one)."""
    start = random.SystemRandom().randrange(2**32) if seed is None else seed
    return [(start + i) % (MAX_SEED + 1) for i in range(count)]


def next_counter(outdir: Path) -> int:
    """One more than the highest ``<counter>_<seed>.png`` already in ``outdir`` (0 for a new folder), so
    earlier images are never overwritten."""
    numbers = [int(m.group(1)) for p in outdir.glob("*.png") if (m := FILE_NAME.match(p.name))]
    return max(numbers, default=-1) + 1


def png_text(prompt: SamplePrompt, seed: int, *, sampler: str, clip_skip: int | None, model: str,
             networks: Sequence[NetworkSpec], embeddings: Sequence[str]) -> dict[str, str]:
    """PNG text chunks: one key per setting, plus an AUTOMATIC1111-style ``parameters`` summary."""
    text = {"prompt": prompt.prompt, "negative-prompt": prompt.negative_prompt, "seed": str(seed),
            "steps": str(prompt.steps), "scale": str(prompt.scale), "sampler": sampler,
            "width": str(prompt.width), "height": str(prompt.height), "model": model}
    if clip_skip is not None:
        text["clip-skip"] = str(clip_skip)
    if networks:
        text["networks"] = json.dumps([{"module": n.module, "weights": str(n.weights), "multiplier": n.multiplier}
                                       for n in networks])
    if embeddings:
        text["embeddings"] = json.dumps([str(e) for e in embeddings])
    negative = f"\nNegative prompt: {prompt.negative_prompt}" if prompt.negative_prompt else ""
    text["parameters"] = (f"{prompt.prompt}{negative}\nSteps: {prompt.steps}, Sampler: {sampler}, CFG scale: "
                          f"{prompt.scale}, Seed: {seed}, Size: {prompt.width}x{prompt.height}")
    return text


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

class PromptEncodings:
    """The conditioning of each distinct (prompt, negative prompt) pair, encoded once and reused for every
    batch and image of it (the last :data:`PROMPT_CACHE_SIZE` pairs are kept, so a long prompt file does
    not hold them all). The pair is encoded together, exactly as
    :func:`library.training.sampling.encode_prompt_pair` does for a single batch, so images are unchanged."""

    def __init__(self, components: Any, size: int = PROMPT_CACHE_SIZE):
        """Encode with ``components`` (a :class:`library.training.sampling.SampleComponents`)."""
        self.components, self.size = components, size
        self.kept: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.encoded = 0  # how many pairs were encoded (for the log and the tests)

    def get(self, prompt: SamplePrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) conditioning of ``prompt``, from the cache when it was encoded before."""
        from library.training import sampling

        key = (prompt.prompt, prompt.negative_prompt)
        if key in self.kept:
            self.kept.move_to_end(key)
            return self.kept[key]
        pair = sampling.encode_prompt_pair(self.components, *key)
        self.encoded += 1
        self.kept[key] = pair
        if len(self.kept) > self.size:
            self.kept.popitem(last=False)
        return pair


def generate(opts: GenerationOptions) -> list[Path]:
    """Check the options, load the model, networks and embeddings, and write every image; returns the
    written files in order."""
    from tqdm import tqdm

    from library.models.load import load_model
    from library.models.placement import place
    from library.training.sampling import SampleComponents, generate_images, to_uint8, with_prompt_transform
    from library.training.sampling import write_png

    check_generation_options(opts)
    specs = network_specs(opts.network_module, opts.network_weights, opts.network_mul)
    prompts = read_prompts(opts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = opts.weight_dtype
    model = load_model(opts.ckpt, v2=opts.v2, v_parameterization=opts.v_parameterization, vae=opts.vae,
                       tokenizer_cache_dir=opts.tokenizer_cache_dir, dtype=torch.float32)
    transform = load_embeddings(model, opts.embedding_files)
    for part, part_dtype in ((model.unet, dtype), (model.vae, dtype), (model.text_encoder, torch.float32)):
        part.requires_grad_(False)
        place(part, device, part_dtype)
    set_attention(model.unet, device, xformers=opts.xformers, sdpa=opts.sdpa)
    apply_networks(model, specs, device)
    parts = SampleComponents(model.unet, model.vae, model.text_encoder, model.tokenizer, model.v_parameterization,
                             clip_skip=opts.clip_skip, max_token_length=opts.max_token_length)
    encodings = PromptEncodings(parts)
    outdir = Path(opts.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    counter = next_counter(outdir)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    written: list[Path] = []
    with tqdm(total=len(prompts) * opts.images_per_prompt, desc="generating", unit="image") as bar, autocast:
        for prompt in prompts:
            seeds = image_seeds(prompt.seed, opts.images_per_prompt)
            conditioned = with_prompt_transform(prompt, transform)
            embeds = encodings.get(conditioned)
            for start in range(0, len(seeds), opts.batch_size):
                batch = seeds[start:start + opts.batch_size]
                generators = [torch.Generator(device="cpu").manual_seed(s) for s in batch]
                images = generate_images(parts, conditioned, sampler=opts.sampler, generators=generators,
                                         embeds=embeds)
                for seed, image in zip(batch, images):
                    path = outdir / f"{counter:06d}_{seed}.png"
                    while path.exists():
                        counter += 1
                        path = outdir / f"{counter:06d}_{seed}.png"
                    text = png_text(prompt, seed, sampler=opts.sampler, clip_skip=opts.clip_skip, model=opts.ckpt,
                                    networks=specs, embeddings=opts.embedding_files)
                    written.append(write_png(path, to_uint8(image), text))
                    counter += 1
                    bar.update(1)
    logger.info("encoded %d distinct prompt(s) for %d image(s)", encodings.encoded, len(written))
    return written
