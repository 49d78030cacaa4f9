"""Diffusion math (library/training/diffusion.py) against hand-computed values on small fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from library.training.diffusion import (
    add_noise,
    apply_loss_mask,
    debiased_estimation_weight,
    diffusion_loss,
    elementwise_loss,
    huber_threshold,
    make_noise_scheduler,
    min_snr_weight,
    perturb_noise,
    pyramid_noise,
    sample_noise,
    sample_timesteps,
    snr,
    target_for,
    v_pred_scale,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_beta(i: int) -> float:
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    return (lo + i * (hi - lo) / 999) ** 2


def hand_alpha_bar(t: int) -> float:
    return math.prod(1.0 - hand_beta(i) for i in range(t + 1))


def hand_snr(t: int) -> float:
    a = hand_alpha_bar(t)
    return a / (1.0 - a)


@pytest.fixture(scope="module")
def eps_sched():
    return make_noise_scheduler(False)


@pytest.fixture(scope="module")
def v_sched():
    return make_noise_scheduler(True)


LATENTS = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4) / 64.0 - 0.5


# ---------------------------------------------------------------- constants


def test_scheduler_constants(eps_sched, v_sched):
    cfg = eps_sched.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.clip_sample) == (
        1000,
        "scaled_linear",
        False,
    )
    assert cfg.prediction_type == "epsilon" and v_sched.config.prediction_type == "v_prediction"
    for t in (0, 1, 500, 999):
        assert eps_sched.betas[t].item() == pytest.approx(hand_beta(t), rel=1e-5)
        assert eps_sched.alphas_cumprod[t].item() == pytest.approx(hand_alpha_bar(t), rel=1e-4)
    assert torch.equal(eps_sched.alphas_cumprod, v_sched.alphas_cumprod)


def test_snr_values(eps_sched):
    t = torch.tensor([0, 10, 500, 999])
    expected = torch.tensor([hand_snr(i) for i in (0, 10, 500, 999)])
    torch.testing.assert_close(snr(eps_sched, t), expected, rtol=1e-4, atol=0)


def test_zero_terminal_snr():
    plain, zt = (
        make_noise_scheduler(True),
        make_noise_scheduler(True, zero_terminal_snr=True),
    )
    assert zt.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert zt.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-5)
    assert snr(zt, torch.tensor([999])).item() == pytest.approx(0.0, abs=1e-12)
    # min-SNR stays finite at SNR = 0: ε weight 1, v weight 0
    assert min_snr_weight(torch.tensor([999]), zt, 5.0, False).item() == 1.0
    assert min_snr_weight(torch.tensor([999]), zt, 5.0, True).item() == 0.0


# ---------------------------------------------------------------- noise


def test_plain_noise_is_first_generator_draw():
    noise = sample_noise(LATENTS, gen(3))
    torch.testing.assert_close(noise, torch.randn(LATENTS.shape, generator=gen(3)), rtol=0, atol=0)


def test_offset_noise_by_hand():
    g = gen(1)
    eps = torch.randn(LATENTS.shape, generator=g)
    n = torch.randn((2, 4, 1, 1), generator=g)
    noise = sample_noise(LATENTS, gen(1), noise_offset=0.1)
    torch.testing.assert_close(noise, eps + 0.1 * n, rtol=0, atol=1e-7)
    # zero / None disables it
    torch.testing.assert_close(sample_noise(LATENTS, gen(1), noise_offset=0.0), eps, rtol=0, atol=0)


def test_adaptive_noise_scale_by_hand():
    latents = torch.zeros(1, 2, 2, 2)
    latents[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean 2.5
    latents[0, 1] = torch.tensor([[-1.0, -1.0], [-1.0, -3.0]])  # mean -1.5
    g = gen(2)
    eps = torch.randn(latents.shape, generator=g)
    n = torch.randn((1, 2, 1, 1), generator=g)
    noise = sample_noise(latents, gen(2), noise_offset=0.1, adaptive_noise_scale=0.2)
    o = torch.tensor([0.1 + 0.2 * 2.5, 0.1 + 0.2 * 1.5]).view(1, 2, 1, 1)
    torch.testing.assert_close(noise, eps + o * n, rtol=0, atol=1e-6)
    # negative scale: clamped at 0 -> channel 0 gets no offset (0.1 - 0.1*2.5 < 0), channel 1 gets 0.1 - 0.15 < 0
    noise = sample_noise(latents, gen(2), noise_offset=0.1, adaptive_noise_scale=-0.1)
    torch.testing.assert_close(noise, eps, rtol=0, atol=0)
    with pytest.raises(ValueError):
        sample_noise(latents, gen(2), adaptive_noise_scale=0.2)


def test_offset_random_strength_by_hand():
    g = gen(4)
    eps = torch.randn(LATENTS.shape, generator=g)
    u = torch.rand((1,), generator=g).item()
    n = torch.randn((2, 4, 1, 1), generator=g)
    noise = sample_noise(LATENTS, gen(4), noise_offset=0.1, noise_offset_random_strength=True)
    torch.testing.assert_close(noise, eps + 0.1 * u * n, rtol=0, atol=1e-7)


def test_pyramid_noise_by_hand():
    latents = torch.zeros(2, 4, 8, 8)
    g = gen(5)
    eps = torch.randn(latents.shape, generator=g)
    expected = eps.clone()
    for i in range(10):
        r = 2.0 + 2.0 * torch.rand((1,), generator=g).item()
        h = w = max(1, int(8 / r**i))  # each level from the original size (fixed baseline bug)
        level = torch.randn((2, 4, h, w), generator=g)
        expected += F.interpolate(level, size=(8, 8), mode="bilinear", align_corners=False) * 0.3**i
        if h == 1:
            break
    expected /= expected.std()
    noise = sample_noise(latents, gen(5), multires_iterations=10, multires_discount=0.3)
    assert noise.shape == latents.shape
    torch.testing.assert_close(noise, expected, rtol=0, atol=1e-6)
    assert noise.std().item() == pytest.approx(1.0, abs=1e-6)


def test_pyramid_zero_iterations_is_plain_noise():
    noise = torch.randn(1, 4, 8, 8, generator=gen(0))
    assert torch.equal(pyramid_noise(noise, gen(1), 0), noise)
    assert torch.equal(
        sample_noise(LATENTS, gen(6), multires_iterations=0),
        sample_noise(LATENTS, gen(6)),
    )


def test_offset_then_pyramid_order():
    g = gen(7)
    eps = torch.randn(LATENTS.shape, generator=g)
    n = torch.randn((2, 4, 1, 1), generator=g)
    expected = pyramid_noise(eps + 0.1 * n, g, 3, 0.3)
    noise = sample_noise(LATENTS, gen(7), noise_offset=0.1, multires_iterations=3)
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)


def test_noise_determinism_and_dtype():
    kw = {"noise_offset": 0.05, "multires_iterations": 4}
    a, b = sample_noise(LATENTS, gen(11), **kw), sample_noise(LATENTS, gen(11), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_noise(LATENTS, gen(12), **kw))
    bf = sample_noise(LATENTS.to(torch.bfloat16), gen(11), **kw)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), a, rtol=1e-2, atol=1e-2)


def test_perturb_noise_by_hand():
    noise = torch.randn(LATENTS.shape, generator=gen(0))
    extra = torch.randn(LATENTS.shape, generator=gen(8))
    torch.testing.assert_close(perturb_noise(noise, gen(8), 0.1), noise + 0.1 * extra, rtol=0, atol=1e-7)
    g = gen(9)
    u = torch.rand((1,), generator=g).item()
    extra = torch.randn(LATENTS.shape, generator=g)
    out = perturb_noise(noise, gen(9), 0.1, random_strength=True)
    torch.testing.assert_close(out, noise + 0.1 * u * extra, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- timesteps


def test_timesteps():
    t = sample_timesteps(64, gen(0))
    assert t.dtype == torch.long and t.shape == (64,)
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=gen(0)))
    assert torch.equal(t, sample_timesteps(64, gen(0)))
    assert not torch.equal(t, sample_timesteps(64, gen(1)))
    r = sample_timesteps(256, gen(2), 100, 200)
    assert r.min() >= 100 and r.max() < 200
    assert torch.equal(sample_timesteps(3, gen(0), 500, 500), torch.tensor([500, 500, 500]))
    for lo, hi in ((-1, 10), (10, 5), (0, 1001), (1000, 1000)):
        with pytest.raises(ValueError):
            sample_timesteps(2, gen(0), lo, hi)


# ---------------------------------------------------------------- targets


def test_add_noise_and_targets(eps_sched, v_sched):
    noise = torch.randn(LATENTS.shape, generator=gen(0))
    t = torch.tensor([3, 700])
    a = torch.tensor([hand_alpha_bar(3), hand_alpha_bar(700)]).view(2, 1, 1, 1)
    expected = a.sqrt() * LATENTS + (1 - a).sqrt() * noise
    torch.testing.assert_close(add_noise(eps_sched, LATENTS, noise, t), expected, rtol=1e-4, atol=1e-5)
    assert target_for(eps_sched, LATENTS, noise, t, False) is noise
    v = target_for(v_sched, LATENTS, noise, t, True)
    torch.testing.assert_close(v, v_sched.get_velocity(LATENTS, noise, t), rtol=0, atol=0)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * LATENTS, rtol=1e-4, atol=1e-5)


def test_bf16_forward_and_loss(v_sched):
    lat = LATENTS.to(torch.bfloat16)
    noise = sample_noise(lat, gen(0))
    t = sample_timesteps(2, gen(0))
    x_t = add_noise(v_sched, lat, noise, t)
    target = target_for(v_sched, lat, noise, t, True)
    assert x_t.dtype == target.dtype == torch.bfloat16
    loss = diffusion_loss(
        x_t,
        target,
        timesteps=t,
        scheduler=v_sched,
        min_snr_gamma=5,
        v_parameterization=True,
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---------------------------------------------------------------- weights


def test_min_snr_weights_by_hand(eps_sched):
    ts = [0, 50, 200, 500, 999]
    t = torch.tensor(ts)
    s = [hand_snr(i) for i in ts]
    eps_expected = torch.tensor([min(5.0 / x, 1.0) for x in s])
    v_expected = torch.tensor([min(x, 5.0) / (x + 1.0) for x in s])
    torch.testing.assert_close(min_snr_weight(t, eps_sched, 5.0, False), eps_expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(min_snr_weight(t, eps_sched, 5.0, True), v_expected, rtol=1e-4, atol=0)
    # ε formula equals min(SNR, γ)/SNR
    alt = torch.tensor([min(x, 5.0) / x for x in s])
    torch.testing.assert_close(min_snr_weight(t, eps_sched, 5.0, False), alt, rtol=1e-4, atol=0)


def test_debiased_and_v_scale_by_hand(eps_sched):
    ts = [0, 100, 900]
    t = torch.tensor(ts)
    s = [min(hand_snr(i), 1000.0) for i in ts]  # SNR(0) ≈ 1175 is clamped to 1000
    assert hand_snr(0) > 1000
    eps_w = torch.tensor([1 / math.sqrt(x) for x in s])
    v_w = torch.tensor([1 / (x + 1) for x in s])
    torch.testing.assert_close(debiased_estimation_weight(t, eps_sched, False), eps_w, rtol=1e-4, atol=0)
    torch.testing.assert_close(debiased_estimation_weight(t, eps_sched, True), v_w, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        v_pred_scale(t, eps_sched),
        torch.tensor([x / (x + 1) for x in s]),
        rtol=1e-4,
        atol=0,
    )


def test_huber_schedules_by_hand(eps_sched):
    t = torch.tensor([0, 250, 999])
    const = huber_threshold(t, eps_sched, 0.1, "constant", 2.0)
    torch.testing.assert_close(const, torch.full((3,), 0.2))
    expo = huber_threshold(t, eps_sched, 0.1, "exponential", 2.0)
    torch.testing.assert_close(
        expo,
        torch.tensor([2.0 * math.exp(-i * math.log(10) / 1000) for i in (0, 250, 999)]),
    )
    sig = [math.sqrt((1 - hand_alpha_bar(i)) / hand_alpha_bar(i)) for i in (0, 250, 999)]
    snr_c = huber_threshold(t, eps_sched, 0.1, "snr")
    torch.testing.assert_close(snr_c, torch.tensor([0.9 / (1 + x) ** 2 + 0.1 for x in sig]), rtol=1e-4, atol=0)
    with pytest.raises(ValueError):
        huber_threshold(t, eps_sched, 0.1, "nope")


# ---------------------------------------------------------------- loss


def test_elementwise_losses_by_hand():
    pred = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 0.0]]]])  # (2, 1, 1, 2)
    target = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 3.0]]]])
    c = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(
        elementwise_loss(pred, target, "l2"),
        torch.tensor([[[[1.0, 4.0]]], [[[0.25, 9.0]]]]),
    )
    torch.testing.assert_close(
        elementwise_loss(pred, target, "l1"),
        torch.tensor([[[[1.0, 2.0]]], [[[0.5, 3.0]]]]),
    )

    def hub(d, cc):
        return 2 * cc * (math.sqrt(d * d + cc * cc) - cc)

    huber = torch.tensor([[[[hub(1, 0.5), hub(2, 0.5)]]], [[[hub(0.5, 2), hub(3, 2)]]]])
    torch.testing.assert_close(elementwise_loss(pred, target, "huber", c), huber)
    torch.testing.assert_close(elementwise_loss(pred, target, "smooth_l1", c), huber / c.view(2, 1, 1, 1))
    with pytest.raises(ValueError):
        elementwise_loss(pred, target, "l3")
    with pytest.raises(ValueError):
        elementwise_loss(pred, target, "huber")


def test_loss_plain_and_prior_weight(eps_sched):
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.zeros(2, 4, 2, 2)
    target[0] = 1.0  # per-sample MSE 1
    target[1] = 2.0  # per-sample MSE 4
    t = torch.tensor([10, 20])
    assert diffusion_loss(pred, target, timesteps=t, scheduler=eps_sched).item() == pytest.approx(2.5)
    w = torch.tensor([1.0, 0.5])  # second sample is a reg image with prior_loss_weight 0.5
    loss = diffusion_loss(pred, target, timesteps=t, scheduler=eps_sched, loss_weights=w)
    assert loss.item() == pytest.approx((1.0 + 0.5 * 4.0) / 2)


def test_loss_with_min_snr_by_hand(eps_sched, v_sched):
    pred = torch.zeros(3, 4, 2, 2)
    target = torch.stack([torch.full((4, 2, 2), v) for v in (1.0, 2.0, 3.0)])
    ts = [5, 400, 900]
    t = torch.tensor(ts)
    w = torch.tensor([1.0, 0.25, 1.0])
    mse = [1.0, 4.0, 9.0]
    s = [hand_snr(i) for i in ts]
    eps_expected = sum(m * ww * min(5 / x, 1) for m, ww, x in zip(mse, w.tolist(), s)) / 3
    v_expected = sum(m * ww * min(x, 5) / (x + 1) for m, ww, x in zip(mse, w.tolist(), s)) / 3
    kw = {"timesteps": t, "loss_weights": w, "min_snr_gamma": 5.0}
    assert diffusion_loss(pred, target, scheduler=eps_sched, **kw).item() == pytest.approx(eps_expected, rel=1e-4)
    loss_v = diffusion_loss(pred, target, scheduler=v_sched, v_parameterization=True, **kw)
    assert loss_v.item() == pytest.approx(v_expected, rel=1e-4)


def test_loss_later_additions_by_hand(eps_sched):
    pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[1.0, 3.0]]], [[[2.0, 0.0]]]])
    ts = [30, 600]
    t = torch.tensor(ts)
    s = [hand_snr(i) for i in ts]
    scale = [x / (x + 1) for x in s]
    mse = [5.0, 2.0]
    kw = {"timesteps": t, "scheduler": eps_sched}
    expected = sum(m / math.sqrt(x) for m, x in zip(mse, s)) / 2
    assert diffusion_loss(pred, target, debiased_estimation=True, **kw).item() == pytest.approx(expected, rel=1e-4)
    expected = sum(m * k for m, k in zip(mse, scale)) / 2
    loss = diffusion_loss(pred, target, scale_v_pred_loss_like_noise_pred=True, **kw)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    expected = sum(m + 0.5 * m / k for m, k in zip(mse, scale)) / 2
    assert diffusion_loss(pred, target, v_pred_like_loss=0.5, **kw).item() == pytest.approx(expected, rel=1e-4)
    hub = [2 * 0.1 * (math.sqrt(d * d + 0.01) - 0.1) for d in (1.0, 3.0, 2.0, 0.0)]
    expected = (hub[0] + hub[1] + hub[2] + hub[3]) / 4
    loss = diffusion_loss(pred, target, loss_type="huber", huber_c=0.1, huber_schedule="constant", **kw)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mask_applied(eps_sched):
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2) * torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # squared: 1, 4, 9, 16
    mask = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])  # (B, H, W)
    loss = diffusion_loss(pred, target, timesteps=torch.tensor([0]), scheduler=eps_sched, mask=mask)
    assert loss.item() == pytest.approx((1.0 + 0.5 * 9.0) / 4)
    # a larger mask is area-resized to the latent size: 4x4 of quadrant values -> 2x2
    big = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1).view(1, 1, 4, 4)
    torch.testing.assert_close(apply_loss_mask(torch.ones(1, 3, 2, 2), big), torch.ones(1, 3, 2, 2) * mask)
