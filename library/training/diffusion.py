"""Diffusion math for training: the noise schedule, noise variants, timesteps, targets and the loss.

Everything here is a small pure function of its arguments (training_behaviour.md §2-§6, §26).
Randomness comes only from an explicit ``torch.Generator``: draws are made on the generator's device
in float32 and then moved/cast to the latents' device and dtype, so one seeded CPU generator
reproduces the same noise on any device.

The random functions also take a *sequence* of generators, one per sample (the trainer's way: each
sample's generator is seeded from the sample's identity, library/data/dataset.py ``noise_seed``). Then
every sample is drawn as a batch of one from its own generator: what is drawn once per batch with one
generator (the random offset strength, the pyramid levels' ``r``, the random input-perturbation
strength) is drawn per sample, and the pyramid noise is normalised by each sample's own std. So a
sample's noise does not depend on the other samples of its batch, on the batch size or on the number of
processes, and nothing needs saving for an exact resume.

Items marked *later addition* are upstream behaviour added after the 2023-05 baseline (§26).
Known baseline bugs are not reproduced (§25): pyramid-noise level sizes are computed from the
original size, and min-SNR uses the v-prediction formula for v-prediction.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CLAMP = 1000.0  # upper clamp of SNR in the debiased / v-pred-like scales (SNR(0) ≈ 1175)


# --------------------------------------------------------------------------------------------------
# Schedule


LATENT_SCALE = 0.18215  # the SD VAE latent scaling factor: model latents = VAE latents × this

def make_noise_scheduler(v_parameterization: bool, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The training noise scheduler: DDPM, scaled_linear betas 0.00085-0.012, 1000 steps, no clipping.

    ``prediction_type`` is ``"v_prediction"`` with ``v_parameterization``, else ``"epsilon"``.
    ``zero_terminal_snr`` (*later addition*) rescales the betas so that ᾱ_999 = 0 while √ᾱ_0 is kept
    (diffusers' ``rescale_betas_zero_snr``, the same shift-and-scale of √ᾱ as upstream).
    """
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def _alphas_cumprod(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """ᾱ_t in float32 for each timestep, on the timesteps' device."""
    table = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    return table[timesteps.long()]


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``SNR(t) = ᾱ_t / (1 − ᾱ_t)`` per timestep, float32 (0 at a zero terminal SNR)."""
    alpha_bar = _alphas_cumprod(scheduler, timesteps)
    return alpha_bar / (1.0 - alpha_bar)


# --------------------------------------------------------------------------------------------------
# Noise and timesteps


Generators = Union[torch.Generator, Sequence[torch.Generator]]  # one, or one per sample


def _per_sample(generator: Generators, batch_size: int) -> Sequence[torch.Generator] | None:
    """The per-sample generators (checked against the batch size), or None for a single generator."""
    if isinstance(generator, torch.Generator):
        return None
    if len(generator) != batch_size:
        raise ValueError(f"{len(generator)} generators for a batch of {batch_size} samples")
    return generator


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard normal float32 draws on the generator's device."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def normal(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """Standard normal float32 draws of ``shape`` (batch first), on the (first) generator's device; with one
    generator per sample, sample ``j`` is drawn from ``generator[j]``."""
    gens = _per_sample(generator, shape[0])
    if gens is None:
        return _randn(shape, generator)
    return torch.stack([_randn(tuple(shape[1:]), g).to(gens[0].device) for g in gens])


def _rand(generator: torch.Generator) -> float:
    """One uniform [0, 1) draw from the generator."""
    return float(torch.rand((1,), generator=generator, device=generator.device).item())


def offset_noise(
    latents: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator,
    noise_offset: float,
    adaptive_noise_scale: float | None = None,
) -> torch.Tensor:
    """Offset noise (§4.1) with the optional adaptive scale (§4.2); returns float32 noise.

    ``ε + o_bc · n_bc`` with ``n ~ N(0, 1)`` of shape (B, C, 1, 1) (one draw from ``generator``), where
    ``o_bc = o`` or, with an adaptive scale ``a``, ``o_bc = max(0, o + a · |mean_{h,w}(x0_bc)|)``.
    """
    b, c = latents.shape[:2]
    offset: torch.Tensor | float = noise_offset
    if adaptive_noise_scale is not None:
        latent_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, min=0.0)
    n = _randn((b, c, 1, 1), generator).to(noise.device)
    return noise.float() + offset * n


def pyramid_noise(
    noise: torch.Tensor,
    generator: torch.Generator,
    iterations: int,
    discount: float = 0.3,
) -> torch.Tensor:
    """Multi-resolution (pyramid) noise (§4.3, with the upstream size fix); returns float32 noise.

    For level i = 0…K−1: ``r = uniform(2, 4)``; level size ``(max(1, int(H / r^i)), max(1, int(W / r^i)))``
    taken from the *original* size; add ``bilinear_upsample_to(H, W)(randn(B, C, h, w)) · d^i``; stop after
    a level with h == 1 or w == 1. Finally divide by the global (unbiased) std of the whole tensor.
    Each level draws r then its noise from ``generator``. ``iterations`` ≤ 0 returns the input (as float32) unchanged.
    """
    out = noise.float()
    if iterations <= 0:
        return out
    b, c, height, width = noise.shape
    for i in range(iterations):
        r = 2.0 + 2.0 * _rand(generator)
        h = max(1, int(height / r**i))
        w = max(1, int(width / r**i))
        level = _randn((b, c, h, w), generator).to(noise.device)
        level = F.interpolate(level, size=(height, width), mode="bilinear", align_corners=False)
        out = out + level * discount**i
        if h == 1 or w == 1:
            break
    return out / out.std()


def sample_noise(
    latents: torch.Tensor,
    generator: Generators,
    *,
    noise_offset: float | None = None,
    adaptive_noise_scale: float | None = None,
    multires_iterations: int | None = None,
    multires_discount: float = 0.3,
    noise_offset_random_strength: bool = False,
) -> torch.Tensor:
    """Training noise for ``latents`` (scaled x0, shape (B, C, H, W)), in the latents' dtype and device.

    Draw order from ``generator``: ε ~ N(0, I); then, when ``noise_offset`` is truthy, offset noise
    (§4.1/§4.2; with ``noise_offset_random_strength`` (*later addition*) the strength is first drawn
    uniformly in [0, noise_offset]); then, when ``multires_iterations`` is truthy, pyramid noise (§4.3),
    whose std normalisation therefore also covers the offset. Using both offset and pyramid noise is a
    *later addition* (the baseline rejects it when parsing options).

    With one generator per sample, each sample runs this whole order from its own generator (a batch of one).

    Raises ValueError when ``adaptive_noise_scale`` is given without ``noise_offset``.
    """
    if adaptive_noise_scale is not None and noise_offset is None:
        raise ValueError("adaptive_noise_scale requires noise_offset")
    gens = _per_sample(generator, latents.shape[0])
    if gens is not None:
        return torch.cat([sample_noise(latents[j:j + 1], g, noise_offset=noise_offset,
                                       adaptive_noise_scale=adaptive_noise_scale, multires_iterations=multires_iterations,
                                       multires_discount=multires_discount,
                                       noise_offset_random_strength=noise_offset_random_strength)
                          for j, g in enumerate(gens)])
    noise = _randn(tuple(latents.shape), generator).to(latents.device)
    if noise_offset:
        strength = noise_offset * _rand(generator) if noise_offset_random_strength else noise_offset
        noise = offset_noise(latents, noise, generator, strength, adaptive_noise_scale)
    if multires_iterations:
        noise = pyramid_noise(noise, generator, multires_iterations, multires_discount)
    return noise.to(latents.dtype)


def perturb_noise(
    noise: torch.Tensor,
    generator: Generators,
    gamma: float,
    random_strength: bool = False,
) -> torch.Tensor:
    """Input-perturbation noise (*later addition*, ``--ip_noise_gamma``): ``ε + γ · ε'`` with a fresh ε'.

    Use the result only to build x_t; the target stays the unperturbed ε (or v from it). With
    ``random_strength`` γ is first drawn uniformly in [0, gamma] (per sample with one generator per
    sample). Same dtype and device as ``noise``.
    """
    gens = _per_sample(generator, noise.shape[0])
    if gens is not None:
        return torch.cat([perturb_noise(noise[j:j + 1], g, gamma, random_strength) for j, g in enumerate(gens)])
    if random_strength:
        gamma = gamma * _rand(generator)
    extra = _randn(tuple(noise.shape), generator).to(noise.device)
    return (noise.float() + gamma * extra).to(noise.dtype)


def sample_timesteps(
    batch_size: int,
    generator: Generators,
    min_timestep: int = 0,
    max_timestep: int = NUM_TRAIN_TIMESTEPS,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Integer timesteps, uniform in ``[min_timestep, max_timestep)`` independently per sample (int64).

    The defaults give the baseline range 0…999 (§5). Restricting the range is a *later addition*;
    ``min_timestep == max_timestep`` gives that constant timestep (no draw). Drawn on the generator's
    device, returned on ``device`` (default: the generator's). With one generator per sample, sample ``j``'s
    timestep comes from ``generator[j]``. Raises ValueError for a bad range.
    """
    gens = _per_sample(generator, batch_size)
    if gens is not None:
        t = torch.cat([sample_timesteps(1, g, min_timestep, max_timestep).to(gens[0].device) for g in gens])
        return t.to(device) if device is not None else t
    if not 0 <= min_timestep <= max_timestep <= NUM_TRAIN_TIMESTEPS or min_timestep == NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"timestep range must satisfy 0 <= min <= max <= {NUM_TRAIN_TIMESTEPS} and min < "
            f"{NUM_TRAIN_TIMESTEPS}; got min={min_timestep}, max={max_timestep}"
        )
    if min_timestep == max_timestep:
        t = torch.full((batch_size,), min_timestep, dtype=torch.long, device=generator.device)
    else:
        t = torch.randint(
            min_timestep,
            max_timestep,
            (batch_size,),
            generator=generator,
            device=generator.device,
        )
    return t.to(device) if device is not None else t


# --------------------------------------------------------------------------------------------------
# Forward diffusion and targets


def add_noise(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Forward diffusion ``x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε`` (diffusers ``add_noise``, latents' dtype)."""
    return scheduler.add_noise(latents, noise, timesteps)


def target_for(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    v_parameterization: bool,
) -> torch.Tensor:
    """The regression target: ε, or with v-parameterization ``v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0``."""
    if v_parameterization:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


# --------------------------------------------------------------------------------------------------
# Per-sample weights (all float32, shape (B,))


def min_snr_weight(
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    gamma: float,
    v_parameterization: bool,
) -> torch.Tensor:
    """Min-SNR-γ weight per sample (§6): ε-prediction ``min(γ / SNR, 1)`` (= ``min(SNR, γ) / SNR``).

    v-prediction uses ``min(SNR, γ) / (SNR + 1)`` (the upstream fix; the baseline bug applied the
    ε formula). At SNR = 0 (zero terminal SNR) the ε weight is 1 and the v weight 0.
    """
    s = snr(scheduler, timesteps)
    if v_parameterization:
        return torch.clamp(s, max=gamma) / (s + 1.0)
    return torch.clamp(gamma / s, max=1.0)


def debiased_estimation_weight(
    timesteps: torch.Tensor, scheduler: DDPMScheduler, v_parameterization: bool
) -> torch.Tensor:
    """Debiased-estimation weight (*later addition*): ``1/√SNR`` (ε) or ``1/(SNR + 1)`` (v), SNR ≤ 1000.

    With a zero terminal SNR the ε weight at t = 999 is infinite (as upstream; use v-prediction there).
    """
    s = torch.clamp(snr(scheduler, timesteps), max=SNR_CLAMP)
    if v_parameterization:
        return 1.0 / (s + 1.0)
    return 1.0 / torch.sqrt(s)


def v_pred_scale(timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """``SNR / (SNR + 1)`` with SNR clamped at 1000 (*later addition*, used by the two v-like options below).

    Multiplying a v-loss by it scales it like an ε-loss (``--scale_v_pred_loss_like_noise_pred``).
    """
    s = torch.clamp(snr(scheduler, timesteps), max=SNR_CLAMP)
    return s / (s + 1.0)


def huber_threshold(
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    huber_c: float = 0.1,
    schedule: str = "constant",
    scale: float = 1.0,
) -> torch.Tensor:
    """Per-sample Huber parameter c (*later addition*, §26), float32 shape (B,).

    ``constant``: ``c · scale``; ``exponential``: ``exp(−t · ln(1/c) / 1000) · scale``;
    ``snr``: ``(1 − c) / (1 + σ_t)² + c`` with ``σ_t = √((1 − ᾱ_t) / ᾱ_t)`` (no scale, as specified).
    """
    t = timesteps.to(torch.float32)
    if schedule == "constant":
        return torch.full_like(t, huber_c * scale)
    if schedule == "exponential":
        rate = math.log(1.0 / huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * t) * scale
    if schedule == "snr":
        alpha_bar = _alphas_cumprod(scheduler, timesteps)
        sigma = torch.sqrt((1.0 - alpha_bar) / alpha_bar)
        return (1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r}; allowed: {', '.join(HUBER_SCHEDULES)}")


# --------------------------------------------------------------------------------------------------
# Loss


def elementwise_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    huber_c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-element loss in float32, same shape as ``pred``; δ = pred − target.

    ``l2``: δ² (baseline). *Later additions*: ``l1``: |δ|; ``huber``: ``2c(√(δ² + c²) − c)``;
    ``smooth_l1``: ``2(√(δ² + c²) − c)``, with ``huber_c`` of shape (B,) (one c per sample).
    """
    delta = pred.float() - target.float()
    if loss_type == "l2":
        return delta * delta
    if loss_type == "l1":
        return delta.abs()
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c")
    c = huber_c.to(device=delta.device, dtype=torch.float32).view(-1, *([1] * (delta.dim() - 1)))
    smooth = torch.sqrt(delta * delta + c * c) - c
    return 2.0 * c * smooth if loss_type == "huber" else 2.0 * smooth


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply a (B, C, H, W) element loss by a per-pixel mask (*later addition*, masked loss).

    ``mask`` is (B, H', W') or (B, 1, H', W') with values in [0, 1]; it is area-resized to (H, W) when
    its size differs and broadcast over channels. The loss is not renormalised by the mask area.
    """
    m = mask.to(device=loss.device, dtype=torch.float32)
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if tuple(m.shape[-2:]) != tuple(loss.shape[-2:]):
        m = F.interpolate(m, size=tuple(loss.shape[-2:]), mode="area")
    return loss * m


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    loss_weights: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    v_parameterization: bool = False,
    loss_type: str = "l2",
    huber_c: float = 0.1,
    huber_schedule: str = "constant",
    huber_scale: float = 1.0,
    debiased_estimation: bool = False,
    scale_v_pred_loss_like_noise_pred: bool = False,
    v_pred_like_loss: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar float32 training loss for a batch (§6, §26), in this order:

    1. element loss in fp32 (``loss_type``; Huber c per sample from ``huber_threshold``);
    2. × ``mask`` (if given); 3. mean over C, H, W per sample;
    4. × ``loss_weights`` (per sample, e.g. prior_loss_weight for reg images; default 1);
    5. × min-SNR weight when ``min_snr_gamma`` is truthy;
    6. × SNR/(SNR+1) with ``scale_v_pred_loss_like_noise_pred``;
    7. ``ℓ + w · ℓ / (SNR/(SNR+1))`` with ``v_pred_like_loss`` w (truthy);
    8. × debiased-estimation weight with ``debiased_estimation``;
    9. mean over the batch.
    Steps 6-8 and non-l2 losses and masks are *later additions*.
    """
    c = None
    if loss_type in ("huber", "smooth_l1"):
        c = huber_threshold(timesteps, scheduler, huber_c, huber_schedule, huber_scale)
    loss = elementwise_loss(pred, target, loss_type, c)
    if mask is not None:
        loss = apply_loss_mask(loss, mask)
    per_sample = loss.mean(dim=tuple(range(1, loss.dim())))
    t = timesteps.to(per_sample.device)
    if loss_weights is not None:
        per_sample = per_sample * loss_weights.to(device=per_sample.device, dtype=torch.float32)
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weight(t, scheduler, min_snr_gamma, v_parameterization)
    if scale_v_pred_loss_like_noise_pred:
        per_sample = per_sample * v_pred_scale(t, scheduler)
    if v_pred_like_loss:
        per_sample = per_sample + v_pred_like_loss * per_sample / v_pred_scale(t, scheduler)
    if debiased_estimation:
        per_sample = per_sample * debiased_estimation_weight(t, scheduler, v_parameterization)
    return per_sample.mean()
