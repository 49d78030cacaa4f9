"""Loss and noise options (library/training/loss_options.py): hand-computed losses on a fixed batch through
the loop's own Trainer.loss, the schedules against numpy, CLI runs of every method, and each error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.methods.base import MethodBase
from library.training import diffusion, loss_options
from tests.train_util import make_dataset, run_script
from train_network import main as train_network

LATENT_SCALE = 0.18215


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, captions={0: "sks dog, sitting, grass", 1: "sks dog, running"})


def lora_args(models, data, out, *extra, model="sd1", steps=3):
    flags = ["--v2", "--v_parameterization"] if model == "sd2" else []
    return [*flags, "--pretrained_model_name_or_path", models[model]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-2", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


# ---- the schedule by hand ------------------------------------------------------------------------


def hand_alpha_bar(zero_terminal_snr: bool) -> np.ndarray:
    """ᾱ_t of the scaled-linear schedule (float64), optionally rescaled to a zero terminal SNR."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas)
    if zero_terminal_snr:
        root = np.sqrt(alpha_bar)
        first, last = root[0], root[-1]
        root = (root - last) * first / (first - last)
        alpha_bar = root ** 2
    return alpha_bar


@pytest.mark.parametrize("zts", [False, True])
def test_noise_schedule_matches_the_hand_schedule(zts):
    sched = diffusion.make_noise_scheduler(False, zero_terminal_snr=zts)
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), hand_alpha_bar(zts), rtol=2e-5, atol=1e-7)
    if zts:
        assert float(sched.alphas_cumprod[-1]) == 0.0
        assert float(sched.alphas_cumprod[0]) == pytest.approx(hand_alpha_bar(False)[0], rel=1e-6)


def test_option_names_match_the_math():
    assert loss_options.LOSS_TYPES == diffusion.LOSS_TYPES
    assert loss_options.HUBER_SCHEDULES == diffusion.HUBER_SCHEDULES


def hand_c(t: np.ndarray, c: float, schedule: str, scale: float, alpha_bar: np.ndarray) -> np.ndarray:
    if schedule == "constant":
        return np.full(t.shape, c * scale)
    if schedule == "exponential":
        return np.exp(-t * math.log(1.0 / c) / 1000.0) * scale
    sigma = np.sqrt((1.0 - alpha_bar[t]) / alpha_bar[t])
    return (1.0 - c) / (1.0 + sigma) ** 2 + c


@pytest.mark.parametrize("loss_type,schedule", [("huber", "constant"), ("huber", "exponential"), ("huber", "snr"),
                                                ("smooth_l1", "snr"), ("smooth_l1", "exponential")])
def test_huber_family_on_a_fixed_batch(loss_type, schedule):
    """Two samples, four elements each, at t = 10 and 900: the loss written out element by element."""
    sched = diffusion.make_noise_scheduler(False)
    pred = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]], [[[0.1, 0.2], [-3.0, 1.5]]]])
    target = torch.tensor([[[[0.0, 0.0], [1.0, 0.5]]], [[[0.3, -0.2], [0.0, 1.0]]]])
    t = np.array([10, 900])
    cs = hand_c(t, 0.2, schedule, 1.5, hand_alpha_bar(False))
    expected = 0.0
    for b in range(2):
        d = (pred[b] - target[b]).double().numpy().ravel()
        c = cs[b]
        smooth = np.sqrt(d * d + c * c) - c
        element = 2 * c * smooth if loss_type == "huber" else 2 * smooth
        expected += element.mean() / 2
    got = diffusion.diffusion_loss(pred, target, timesteps=torch.tensor(t), scheduler=sched, loss_type=loss_type,
                                   huber_c=0.2, huber_schedule=schedule, huber_scale=1.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_debiased_weight_by_hand():
    sched = diffusion.make_noise_scheduler(False)
    pred, target = torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2)
    t = np.array([5, 700])
    ab = hand_alpha_bar(False)[t]
    snr = np.minimum(ab / (1 - ab), 1000.0)
    for v, weight in ((False, 1 / np.sqrt(snr)), (True, 1 / (snr + 1))):
        got = diffusion.diffusion_loss(pred, target, timesteps=torch.tensor(t), scheduler=sched,
                                       v_parameterization=v, debiased_estimation=True)
        assert got.item() == pytest.approx(weight.mean(), rel=1e-4)


# ---- the loop's Trainer.loss on a fixed batch ---------------------------------------------------


class FixedText(MethodBase):
    """A method whose conditioning is a fixed tensor; the UNet's parameters are 'trained'."""

    name = "fixed-text"

    def __init__(self, unet, cond):
        self.unet, self.cond = unet, cond

    def param_groups(self):
        return [{"params": list(self.unet.parameters())}]

    def conditioning(self, batch):
        return self.cond


@pytest.fixture(scope="module")
def tiny():
    from library.models.random_model import build_random_model

    model = build_random_model("tiny-sd1")
    model.unet.eval()
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    return model, cond, latents


def loop_loss(tiny, seed: int, masks=None, v: bool = False, **fields) -> torch.Tensor:
    """Trainer.loss of the fixed batch with StepSettings built from ``fields``."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from library.training.trainer import StepSettings, Trainer

    model, cond, latents = tiny
    trainer = Trainer(accelerator=Accelerator(cpu=True), model=SimpleNamespace(unet=model.unet, vae=None),
                      group=None, method=FixedText(model.unet, cond), optimizer=None, lr_scheduler=None, plan=None,
                      step=StepSettings(v_parameterization=v, **fields), save=None, seed=seed)
    batch = {"latents": latents.clone(), "loss_weights": torch.ones(2), "keys": ["a", "b"], "captions": ["a", "b"],
             "noise_seeds": [seed * 1000, seed * 1000 + 1]}  # each sample's generator (dataset.py noise_seed)
    if masks is not None:
        batch["masks"] = masks
    with torch.no_grad():
        return trainer.loss(batch)


def hand_loss(tiny, seed: int, *, loss_type="l2", huber_c=0.1, huber_schedule="snr", huber_scale=1.0,
              zero_terminal_snr=False, debiased=False, gamma=None, random_strength=False, v=False, masks=None):
    """The documented step written out: ε, t, (ε'), x_t, prediction, target, element loss, mask, weights."""
    model, cond, latents = tiny
    sched = diffusion.make_noise_scheduler(v, zero_terminal_snr)
    gs = [torch.Generator().manual_seed(seed * 1000 + j) for j in range(2)]  # one per sample, drawn in turn
    x0 = latents * LATENT_SCALE
    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gs])
    t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gs])
    source = eps
    if gamma:
        strengths = [gamma * float(torch.rand((1,), generator=g)) if random_strength else gamma for g in gs]
        source = eps + torch.stack([s * torch.randn(x0.shape[1:], generator=g) for s, g in zip(strengths, gs)])
    ab = sched.alphas_cumprod[t].view(2, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * source
    with torch.no_grad():
        pred = model.unet(x_t, t, cond).sample
    target = ab.sqrt() * eps - (1 - ab).sqrt() * x0 if v else eps
    d = pred - target
    if loss_type == "l2":
        element = d * d
    elif loss_type == "l1":
        element = d.abs()
    else:
        c = torch.tensor(hand_c(t.numpy(), huber_c, huber_schedule, huber_scale, sched.alphas_cumprod.double()
                                .numpy()), dtype=torch.float32).view(2, 1, 1, 1)
        smooth = torch.sqrt(d * d + c * c) - c
        element = 2 * c * smooth if loss_type == "huber" else 2 * smooth
    if masks is not None:
        element = element * masks
    per_sample = element.mean(dim=(1, 2, 3))
    if debiased:
        snr = torch.clamp(ab.view(2) / (1 - ab.view(2)), max=1000.0)
        per_sample = per_sample * (1 / (snr + 1) if v else 1 / snr.sqrt())
    return per_sample.mean()


CASES = {
    "l2": ({}, {}),
    "l1": ({"loss_type": "l1"}, {"loss_type": "l1"}),
    "huber-constant": ({"loss_type": "huber", "huber_c": 0.3, "huber_schedule": "constant", "huber_scale": 2.0},
                       {"loss_type": "huber", "huber_c": 0.3, "huber_schedule": "constant", "huber_scale": 2.0}),
    "huber-exponential": ({"loss_type": "huber", "huber_schedule": "exponential"},
                          {"loss_type": "huber", "huber_schedule": "exponential"}),
    "huber-snr": ({"loss_type": "huber"}, {"loss_type": "huber"}),
    "smooth_l1-snr": ({"loss_type": "smooth_l1", "huber_c": 0.05}, {"loss_type": "smooth_l1", "huber_c": 0.05}),
    "debiased": ({"debiased_estimation": True}, {"debiased": True}),
    "ip-noise": ({"ip_noise_gamma": 0.1}, {"gamma": 0.1}),
    "ip-noise-random": ({"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True},
                        {"gamma": 0.1, "random_strength": True}),
    "zero-terminal-snr-v-debiased": ({"zero_terminal_snr": True, "debiased_estimation": True},
                                     {"zero_terminal_snr": True, "debiased": True}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loop_loss_equals_the_hand_computed_loss(tiny, name):
    fields, hand = CASES[name]
    v = name.startswith("zero-terminal")
    got = loop_loss(tiny, 4, v=v, **fields)
    expected = hand_loss(tiny, 4, v=v, **hand)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if name != "l2":  # every option changes the loss of this batch
        assert not torch.isclose(got, loop_loss(tiny, 4, v=v), rtol=1e-6, atol=0)


def test_zero_terminal_snr_at_the_last_timestep_is_pure_noise(tiny):
    sched = diffusion.make_noise_scheduler(True, zero_terminal_snr=True)
    x0, eps = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 0.5)
    t = torch.tensor([999])
    assert torch.equal(diffusion.add_noise(sched, x0, eps, t), eps)
    assert torch.equal(diffusion.target_for(sched, x0, eps, t, True), -x0)


def test_mask_zeroing_half_the_latent(tiny):
    masks = torch.ones(2, 1, 8, 8)
    masks[:, :, :, 4:] = 0.0
    got = loop_loss(tiny, 6, masks=masks)
    torch.testing.assert_close(got, hand_loss(tiny, 6, masks=masks), rtol=1e-5, atol=1e-6)
    assert got.item() < loop_loss(tiny, 6).item()


# ---- command line -------------------------------------------------------------------------------


def test_cli_huber_debiased_ip_noise_run_and_record_metadata(models, data, tmp_path):
    assert run_script(train_network, lora_args(models, data, tmp_path / "a")) == 0
    options = ["--loss_type", "huber", "--huber_c", "0.2", "--huber_schedule", "exponential",
               "--debiased_estimation_loss", "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength"]
    assert run_script(train_network, lora_args(models, data, tmp_path / "b", *options)) == 0
    with safe_open(str(tmp_path / "b" / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_loss_type"] == "huber" and meta["ss_huber_c"] == "0.2"
    assert meta["ss_huber_schedule"] == "exponential" and meta["ss_huber_scale"] == "1.0"
    assert meta["ss_debiased_estimation"] == "True" and meta["ss_ip_noise_gamma"] == "0.1"
    assert meta["ss_ip_noise_gamma_random_strength"] == "True" and meta["ss_zero_terminal_snr"] == "False"
    a, b = load_file(str(tmp_path / "a" / "last.safetensors")), load_file(str(tmp_path / "b" / "last.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(tmp_path / "a" / "last.safetensors"), "pt") as f:
        default = f.metadata()
    assert default["ss_loss_type"] == "l2" and default["ss_huber_schedule"] == "snr"


def test_cli_zero_terminal_snr_v_prediction(models, data, tmp_path):
    options = ["--zero_terminal_snr", "--debiased_estimation_loss", "--loss_type", "smooth_l1"]
    assert run_script(train_network, lora_args(models, data, tmp_path / "out", *options, model="sd2")) == 0
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f:
        assert f.metadata()["ss_zero_terminal_snr"] == "True"


def test_cli_other_methods_take_the_options(models, data, tmp_path):
    from train_db import main as train_db
    from train_textual_inversion import main as train_ti

    common = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
              "--resolution", "64", "--max_train_steps", "2", "--seed", "1", "--max_data_loader_n_workers", "0",
              "--loss_type", "smooth_l1", "--ip_noise_gamma", "0.05", "--debiased_estimation_loss"]
    assert run_script(train_db, [*common, "--output_dir", tmp_path / "db", "--learning_rate", "1e-4"]) == 0
    assert run_script(train_ti, [*common, "--output_dir", tmp_path / "ti", "--token_string", "zqx",
                                 "--init_word", "dog", "--learning_rate", "1e-2"]) == 0
    assert (tmp_path / "db" / "last.ckpt").is_file() and (tmp_path / "ti" / "zqx.pt").is_file()


def test_zero_terminal_snr_with_epsilon_warns(models, data, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "out", "--zero_terminal_snr",
                                                   steps=1)) == 0
    assert any("--zero_terminal_snr without --v_parameterization" in r.message for r in caplog.records)


@pytest.mark.parametrize("options,message", [
    (["--loss_type", "huber", "--huber_c", "0"], "--huber_c must be > 0, got 0"),
    (["--loss_type", "smooth_l1", "--huber_c", "-0.5"], "--huber_c must be > 0, got -0.5"),
    (["--loss_type", "huber", "--huber_scale", "0"], "--huber_scale must be > 0, got 0"),
    (["--ip_noise_gamma", "-0.1"], "--ip_noise_gamma must be >= 0, got -0.1"),
    (["--ip_noise_gamma_random_strength"], "--ip_noise_gamma_random_strength needs --ip_noise_gamma"),
    (["--zero_terminal_snr", "--debiased_estimation_loss"],
     "--debiased_estimation_loss with --zero_terminal_snr needs --v_parameterization"),
])
def test_bad_combinations_are_one_line_errors(models, data, tmp_path, capsys, options, message):
    assert run_script(train_network, lora_args(models, data, tmp_path / "out", *options)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_huber_options_with_l2_warn(models, data, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "out", "--huber_c", "0.3",
                                                   steps=1)) == 0
    assert any("--huber_c only affect --loss_type huber" in r.message for r in caplog.records)


def test_resume_with_the_options_is_bit_identical(models, data, tmp_path):
    """The extra draws of --ip_noise_gamma_random_strength come from the saved noise stream: 6 steps straight
    equal 3 steps, save state, resume to 6 (with Huber, debiased weighting and the text-encoder cache)."""
    extra = ["--loss_type", "huber", "--debiased_estimation_loss", "--ip_noise_gamma", "0.2",
             "--ip_noise_gamma_random_strength", "--network_train_unet_only", "--cache_text_encoder_outputs",
             "--train_batch_size", "2", "--flip_aug"]
    assert run_script(train_network, lora_args(models, data, tmp_path / "a", *extra, steps=6)) == 0
    assert run_script(train_network, lora_args(models, data, tmp_path / "b", *extra, "--save_every_n_steps", "3",
                                               "--save_state", steps=6)) == 0
    (tmp_path / "b" / "last.safetensors").unlink()
    state = tmp_path / "b" / "at-step00000003-state"
    assert run_script(train_network, lora_args(models, data, tmp_path / "b", *extra, "--resume", state, steps=6)) == 0
    a, b = load_file(str(tmp_path / "a" / "last.safetensors")), load_file(str(tmp_path / "b" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
