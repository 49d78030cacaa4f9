"""Issue 15, "noise, loss and schedules": --min_timestep / --max_timestep, --noise_offset_random_strength,
--v_pred_like_loss, --scale_v_pred_loss_like_noise_pred, the later lr schedules and their options
(--lr_scheduler_min_lr_ratio, --lr_decay_steps, --lr_scheduler_timescale, ratio / N% step counts) and
--learning_rate_te. The math against hand computation, then CLI runs on the tiny models that show each
option's effect in what the run writes (timesteps recorded by the test hook, TensorBoard scalars, saved
states and checkpoints, the dry-run report)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fine_tune
import train_db
import train_network
import train_textual_inversion
from library.errors import UserError
from library.training import diffusion
from library.training.lr import build_lr_scheduler, lr_at_steps, resolve_steps
from library.training.lr_options import steps_or_ratio
from library.training.timestep_loss_options import timestep_loss_problems, validation_timesteps
from library.option_groups import LossOptions, ValidationOptions
from tests.full_model_util import all_equal, any_differs, ldm_parts
from tests.train_util import make_dataset, record_args, recorded_timesteps, run_script

# ---- hand-computed schedule ------------------------------------------------------------------------------


def hand_snr(t: int) -> float:
    """SNR(t) of the scaled-linear schedule (β from √0.00085 to √0.012, squared), in float64."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    alpha_bar = float(np.cumprod(1.0 - betas)[t])
    return alpha_bar / (1.0 - alpha_bar)


def lrs(name: str, steps: list[int], **kwargs) -> list[float]:
    """lr (with --learning_rate 1) at the given optimizer steps."""
    kwargs.setdefault("max_train_steps", 100)
    return [row[0] for row in lr_at_steps(name, steps, learning_rate=1.0, **kwargs)]


def half_cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- unit: timesteps and the v-prediction loss scalings --------------------------------------------------


def test_timesteps_stay_in_the_half_open_range():
    gen = torch.Generator().manual_seed(3)
    t = diffusion.sample_timesteps(4000, gen, 990, 1000)
    assert int(t.min()) == 990 and int(t.max()) == 999  # [min, max): 1000 itself never comes
    assert diffusion.sample_timesteps(5, gen, 250, 250).tolist() == [250] * 5  # equal ends: that timestep


def test_validation_timesteps_are_kohyas_inner_linspace_points():
    assert validation_timesteps(None, None) is None  # the validation loss keeps its own default
    assert validation_timesteps(0, None) == (200, 400, 600, 800)
    assert validation_timesteps(100, 200) == (120, 140, 160, 180)
    assert validation_timesteps(None, 7) == (1, 2, 4, 5)  # truncated as numpy's int linspace: 1.4, 2.8, 4.2, 5.6
    assert validation_timesteps(500, 500) == (500,) * 4


def test_validator_uses_the_restricted_range():
    from library.training.validation import VALIDATION_TIMESTEPS, make_validator

    held = SimpleNamespace(epoch_batches=lambda epoch: [])
    group = SimpleNamespace(validation=held)
    validation = ValidationOptions(validate_every_n_steps=None, validate_every_n_epochs=None)
    restricted = LossOptions(min_timestep=300, max_timestep=800)
    assert make_validator(validation, restricted, group, 1).settings.timesteps == (400, 500, 600, 700)
    assert make_validator(validation, LossOptions(), group, 1).settings.timesteps == VALIDATION_TIMESTEPS


def _loss_inputs():
    pred = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]], [[[0.1, 0.2], [-3.0, 1.5]]]])
    target = torch.tensor([[[[0.0, 0.0], [1.0, 0.5]]], [[[0.3, -0.2], [0.0, 1.0]]]])
    per_sample = [(0.25 + 1.0 + 1.0 + 0.25) / 4, (0.04 + 0.16 + 9.0 + 0.25) / 4]
    return pred, target, per_sample


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_v_pred_like_loss_by_hand(w):
    """ℓ + w · ℓ / (SNR / (SNR + 1)) per sample (kohya's add_v_prediction_like_loss), then the mean."""
    pred, target, per_sample = _loss_inputs()
    t = [10, 700]
    expected = np.mean([ell + w * ell / (hand_snr(ti) / (hand_snr(ti) + 1)) for ell, ti in zip(per_sample, t)])
    loss = diffusion.diffusion_loss(pred, target, timesteps=torch.tensor(t), scheduler=diffusion.make_noise_scheduler(
        False), v_pred_like_loss=w)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_scale_v_pred_loss_like_noise_pred_by_hand():
    """ℓ · SNR / (SNR + 1), SNR clamped at 1000 (t = 0 has SNR ≈ 1175)."""
    pred, target, per_sample = _loss_inputs()
    t = [0, 950]
    snrs = [min(hand_snr(ti), 1000.0) for ti in t]
    expected = np.mean([ell * s / (s + 1) for ell, s in zip(per_sample, snrs)])
    loss = diffusion.diffusion_loss(pred, target, timesteps=torch.tensor(t), scheduler=diffusion.make_noise_scheduler(
        True), v_parameterization=True, scale_v_pred_loss_like_noise_pred=True)
    assert hand_snr(0) > 1000
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_combination_rules():
    def problems(**kw):
        base = dict(min_timestep=None, max_timestep=None, noise_offset=None, noise_offset_random_strength=False,
                    v_parameterization=False, v_pred_like_loss=None, scale_v_pred_loss_like_noise_pred=False)
        return timestep_loss_problems(argparse.Namespace(**{**base, **kw}))

    assert problems() == [] and problems(min_timestep=400, max_timestep=400) == []
    assert problems(min_timestep=500, max_timestep=400) == ["--min_timestep (500) must be at most --max_timestep (400)"]
    assert problems(noise_offset_random_strength=True) == [
        "--noise_offset_random_strength needs --noise_offset (the largest strength)"]
    assert problems(noise_offset_random_strength=True, noise_offset=0.1) == []
    assert problems(v_pred_like_loss=0.5, v_parameterization=True) == [
        "--v_pred_like_loss cannot be used with --v_parameterization"]
    assert problems(scale_v_pred_loss_like_noise_pred=True) == [
        "--scale_v_pred_loss_like_noise_pred needs --v_parameterization"]
    assert problems(scale_v_pred_loss_like_noise_pred=True, v_parameterization=True) == []


# ---- unit: step counts as ratios, the later schedules -----------------------------------------------------


def test_steps_or_ratio_follows_kohya():
    assert steps_or_ratio("10%") == pytest.approx(0.1) and steps_or_ratio("0.25") == 0.25
    assert steps_or_ratio("5") == 5 and isinstance(steps_or_ratio("5"), int)
    assert steps_or_ratio("100%") == 1.0 and isinstance(steps_or_ratio("100%"), float)
    for bad in ("1.5", "ten", "x%"):
        with pytest.raises(argparse.ArgumentTypeError):
            steps_or_ratio(bad)
    assert resolve_steps(0.1, 95) == 9 and resolve_steps(7, 95) == 7 and resolve_steps(None, 10) == 0


def test_ratio_warmup_is_the_same_as_its_count():
    assert lrs("linear", [0, 5, 10, 55], num_warmup_steps=0.1) == lrs("linear", [0, 5, 10, 55], num_warmup_steps=10)
    assert lrs("linear", [5], num_warmup_steps=0.1) == pytest.approx([0.5])


def test_cosine_with_min_lr():
    values = lrs("cosine_with_min_lr", [0, 5, 10, 55, 100], num_warmup_steps=10, min_lr_ratio=0.1)
    expected = [0.0, 0.5, 1.0, half_cosine(0.5) * 0.9 + 0.1, 0.1]
    assert values == pytest.approx(expected, abs=1e-12)
    # --lr_scheduler_num_cycles 2 (kohya passes num_cycles / 2): a whole cosine wave, back to the top at the end
    assert lrs("cosine_with_min_lr", [50, 100], num_cycles=2, min_lr_ratio=0.1) == pytest.approx([0.1, 1.0])
    with pytest.raises(UserError, match=r"^--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio"):
        lrs("cosine_with_min_lr", [0])
    assert lrs("cosine_with_min_lr", [100], scheduler_args=["min_lr=0.25"]) == pytest.approx([0.25])


def test_warmup_stable_decay():
    steps = [0, 5, 10, 50, 80, 85, 90, 100]
    values = lrs("warmup_stable_decay", steps, num_warmup_steps=10, num_decay_steps=20, min_lr_ratio=0.1)
    ramp = [0.0, 0.5]
    expected = [r * 0.9 + 0.1 for r in ramp] + [1.0, 1.0, 1.0, half_cosine(0.25) * 0.9 + 0.1,
                                                 half_cosine(0.5) * 0.9 + 0.1, 0.1]
    assert values == pytest.approx(expected, abs=1e-12)
    # ratios of the run resolve to the same counts; min ratio defaults to 0
    assert lrs("warmup_stable_decay", steps, num_warmup_steps=0.1, num_decay_steps=0.2, min_lr_ratio=0.1) == values
    assert lrs("warmup_stable_decay", [100], num_decay_steps=20) == [0.0]
    # --lr_scheduler_args reach the built-in schedule, as in kohya: a linear decay instead of the cosine
    linear = lrs("warmup_stable_decay", [85], num_warmup_steps=10, num_decay_steps=20, min_lr_ratio=0.1,
                 scheduler_args=["decay_type='linear'"])
    assert linear == pytest.approx([0.75 * 0.9 + 0.1])
    with pytest.raises(UserError, match=r"exceed the run's 100 scheduler steps"):
        lrs("warmup_stable_decay", [0], num_warmup_steps=60, num_decay_steps=50)
    with pytest.raises(UserError, match=r"^--lr_scheduler warmup_stable_decay: cannot use --lr_scheduler_args"):
        lrs("warmup_stable_decay", [0], num_decay_steps=20, scheduler_args=["no_such_key=1"])


def test_inverse_sqrt():
    # timescale defaults to the warm-up: 1/sqrt(step / warm-up) after it
    assert lrs("inverse_sqrt", [0, 2, 4, 16], num_warmup_steps=4) == pytest.approx([0.0, 0.5, 1.0, 0.5])
    # --lr_scheduler_timescale 8 with 4 warm-up steps: 1/sqrt((step + 4) / 8)
    assert lrs("inverse_sqrt", [4, 28], num_warmup_steps=4, timescale=8) == pytest.approx([1.0, 0.5])
    # no warm-up: timescale 10000
    assert lrs("inverse_sqrt", [0, 30000], max_train_steps=30001) == pytest.approx([1.0, 0.5])


def test_piecewise_constant():
    values = lrs("piecewise_constant", [0, 9, 10, 19, 20, 99], scheduler_args=["step_rules=1:10,0.1:20,0.01"])
    assert values == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(UserError, match=r"^--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules="):
        lrs("piecewise_constant", [0])
    with pytest.raises(UserError, match=r"^--lr_scheduler_args step_rules=1-10: write multiplier:step pairs"):
        lrs("piecewise_constant", [0], scheduler_args=["step_rules=1-10"])
    with pytest.raises(UserError, match=r"^--lr_warmup_steps must be 0 with --lr_scheduler piecewise_constant"):
        lrs("piecewise_constant", [0], num_warmup_steps=5, scheduler_args=["step_rules=1:10,0.1"])


def test_built_schedule_state_resumes_exactly():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler("warmup_stable_decay", optimizer, max_train_steps=10, num_warmup_steps=2,
                                   num_decay_steps=4, min_lr_ratio=0.2)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = build_lr_scheduler("warmup_stable_decay", other, max_train_steps=10, num_warmup_steps=2,
                                 num_decay_steps=4, min_lr_ratio=0.2)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.get_last_lr() == scheduler.get_last_lr() == pytest.approx([half_cosine(0.25) * 0.8 + 0.2])


# ---- CLI ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, folder="2_sks dog", count=2, captions={0: "sks dog", 1: "sks dog, grass"})


@pytest.fixture(scope="module")
def meta(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("meta") / "meta.json"
    path.write_text(json.dumps({f"img{i}": {"caption": f"a photo of sks dog {i}"} for i in range(2)}), encoding="utf-8")
    return path


def script_args(script: str, models, data, meta, out, *extra, steps=1) -> list:
    """The smallest run of each script: tiny SD1, 64 px, ``steps`` steps."""
    common = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--resolution", "64",
              "--output_dir", out, "--max_train_steps", str(steps), "--seed", "1", "--max_data_loader_n_workers", "0"]
    if script == "fine_tune":
        return [*common, "--in_json", meta, "--train_data_dir", data / "2_sks dog", "--learning_rate", "1e-3", *extra]
    common += ["--train_data_dir", data]
    if script == "train_network":
        return [*common, "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-2", *extra]
    if script == "train_textual_inversion":
        return [*common, "--token_string", "zqx", "--init_word", "dog", "--learning_rate", "1e-2", *extra]
    return [*common, "--learning_rate", "1e-3", *extra]


MAINS = {"train_network": train_network.main, "train_db": train_db.main, "fine_tune": fine_tune.main,
         "train_textual_inversion": train_textual_inversion.main}


def scalars(logs: Path, tag: str) -> dict[int, float]:
    """A TensorBoard scalar as written: {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for event_file in logs.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(event_file.parent))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            out.update({e.step: e.value for e in events.Scalars(tag)})
    assert out, f"no {tag} under {logs}"
    return out


@pytest.mark.parametrize("script", list(MAINS))
def test_every_script_trains_inside_the_timestep_range(script, models, data, meta, tmp_path):
    """The timesteps each step drew (the --record_training_dir record) all lie in [640, 650)."""
    record = tmp_path / "record"
    argv = script_args(script, models, data, meta, tmp_path / "out", "--min_timestep", "640", "--max_timestep", "650",
                       *record_args(record), steps=3)
    assert run_script(MAINS[script], argv) == 0
    drawn = recorded_timesteps(record)
    assert len(drawn) == 3 and all(640 <= t < 650 for t in drawn), drawn


def first_loss(models, data, meta, tmp_path, name, *extra) -> float:
    """loss/current of step 1 (the untrained LoRA, so the same prediction in every run) at t = 500."""
    logs = tmp_path / f"logs_{name}"
    argv = script_args("train_network", models, data, meta, tmp_path / name, "--min_timestep", "500",
                       "--max_timestep", "500", "--logging_dir", logs, *extra)
    assert run_script(train_network.main, argv) == 0
    return scalars(logs, "loss/current")[1]


def test_v_pred_like_loss_scales_the_first_loss_by_hand(models, data, meta, tmp_path):
    plain = first_loss(models, data, meta, tmp_path, "plain")
    weighted = first_loss(models, data, meta, tmp_path, "vlike", "--v_pred_like_loss", "0.5")
    s = hand_snr(500)
    assert weighted / plain == pytest.approx(1 + 0.5 / (s / (s + 1)), rel=1e-5)


def test_scale_v_pred_loss_like_noise_pred_scales_the_first_loss_by_hand(models, data, meta, tmp_path):
    plain = first_loss(models, data, meta, tmp_path, "v", "--v_parameterization")
    scaled = first_loss(models, data, meta, tmp_path, "vscaled", "--v_parameterization",
                        "--scale_v_pred_loss_like_noise_pred")
    s = hand_snr(500)
    assert scaled / plain == pytest.approx(s / (s + 1), rel=1e-5)


def test_noise_offset_random_strength_changes_the_noise(models, data, meta, tmp_path):
    """At one fixed timestep the only difference is the offset strength: fixed 0.5 vs uniform in [0, 0.5]."""
    fixed = first_loss(models, data, meta, tmp_path, "fixed", "--noise_offset", "0.5")
    drawn = first_loss(models, data, meta, tmp_path, "drawn", "--noise_offset", "0.5",
                       "--noise_offset_random_strength")
    assert drawn != pytest.approx(fixed, rel=1e-4)


def test_warmup_stable_decay_lrs_logged_per_step(models, data, meta, tmp_path):
    """4 steps, warm-up 25% (1 step), decay 0.5 (2 steps), min ratio 0.2: the lr after each step as
    TensorBoard records it (the next step's lr, as kohya logs it)."""
    logs = tmp_path / "logs"
    argv = script_args("train_network", models, data, meta, tmp_path / "out", "--lr_scheduler", "warmup_stable_decay",
                       "--lr_warmup_steps", "25%", "--lr_decay_steps", "0.5", "--lr_scheduler_min_lr_ratio", "0.2",
                       "--logging_dir", logs, steps=4)
    assert run_script(train_network.main, argv) == 0
    logged = scalars(logs, "lr/unet")
    expected = {1: 1.0, 2: 1.0, 3: half_cosine(0.5) * 0.8 + 0.2, 4: 0.2}
    assert logged == pytest.approx({k: v * 1e-2 for k, v in expected.items()}, rel=1e-6)


def test_dry_run_shows_cosine_with_min_lr(models, data, meta, tmp_path):
    report = tmp_path / "report.json"
    argv = script_args("train_network", models, data, meta, tmp_path / "out", "--lr_scheduler", "cosine_with_min_lr",
                       "--lr_warmup_steps", "10%", "--lr_scheduler_min_lr_ratio", "0.1", "--dry_run_json", report,
                       steps=100)
    assert run_script(train_network.main, argv) == 0
    lr = json.loads(report.read_text())["learning_rate"]
    assert lr["warmup_steps"] == 10
    got = {p["step"]: next(iter(p["lrs"].values())) for p in lr["points"]}
    expected = {0: 0.0, 10: 1.0, 25: half_cosine(15 / 90) * 0.9 + 0.1, 50: half_cosine(40 / 90) * 0.9 + 0.1,
                75: half_cosine(65 / 90) * 0.9 + 0.1, 99: half_cosine(89 / 90) * 0.9 + 0.1}
    assert got == pytest.approx({k: v * 1e-2 for k, v in expected.items()}, rel=1e-9)


@pytest.mark.parametrize("script", ["train_db", "fine_tune"])
def test_learning_rate_te_gets_its_own_group(script, models, data, meta, tmp_path):
    """--learning_rate_te 0: the optimizer's second group (the text encoder) has lr 0, so the text encoder
    comes back bit-identical while the UNet trains; the state and TensorBoard record both lrs."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    extra = ["--train_text_encoder"] if script == "fine_tune" else []
    argv = script_args(script, models, data, meta, out, *extra, "--learning_rate_te", "0", "--save_state",
                       "--logging_dir", logs, steps=2)
    assert run_script(MAINS[script], argv) == 0
    from library.training.checkpoint import load_state

    groups = load_state(out / "last-state")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-3, 0.0]
    assert scalars(logs, "lr/unet") == pytest.approx({1: 1e-3, 2: 1e-3})
    assert scalars(logs, "lr/text_encoder1") == {1: 0.0, 2: 0.0}
    unet, te = ldm_parts(out / "last.ckpt")
    base_unet, base_te = ldm_parts(models["sd1"]["safetensors"])
    assert all_equal(te, base_te) and any_differs(unet, base_unet)


def test_dry_run_lists_the_text_encoder_group(models, data, meta, tmp_path):
    report = tmp_path / "report.json"
    argv = script_args("train_db", models, data, meta, tmp_path / "out", "--learning_rate_te", "5e-4",
                       "--dry_run_json", report, steps=10)
    assert run_script(train_db.main, argv) == 0
    points = json.loads(report.read_text())["learning_rate"]["points"]
    assert points[0]["lrs"] == pytest.approx({"unet": 1e-3, "text encoder": 5e-4})


def test_output_config_round_trips_the_ratio(models, data, meta, tmp_path):
    written = tmp_path / "run.toml"
    argv = script_args("train_network", models, data, meta, tmp_path / "out", "--lr_scheduler", "warmup_stable_decay",
                       "--lr_warmup_steps", "10%", "--lr_decay_steps", "3", "--min_timestep", "100",
                       "--output_config", "--config_file", written)
    with pytest.raises(SystemExit) as done:  # writing the file ends the run, like --help
        run_script(train_network.main, argv)
    assert done.value.code == 0
    from library.config.option_file import parse_with_config_file

    args = parse_with_config_file(train_network.build_parser(), ["--config_file", str(written)])
    assert args.lr_warmup_steps == pytest.approx(0.1) and isinstance(args.lr_warmup_steps, float)
    assert args.lr_decay_steps == 3 and isinstance(args.lr_decay_steps, int) and args.min_timestep == 100


@pytest.mark.parametrize("extra, message", [
    (["--min_timestep", "600", "--max_timestep", "500"], "--min_timestep (600) must be at most --max_timestep (500)"),
    (["--max_timestep", "0"], "--max_timestep must be between 1 and 1000, got 0"),
    (["--v_parameterization", "--v_pred_like_loss", "0.2"],
     "--v_pred_like_loss cannot be used with --v_parameterization"),
    (["--scale_v_pred_loss_like_noise_pred"], "--scale_v_pred_loss_like_noise_pred needs --v_parameterization"),
    (["--noise_offset_random_strength"], "--noise_offset_random_strength needs --noise_offset"),
    (["--lr_scheduler", "linear", "--lr_warmup_steps", "150%"], "--lr_warmup_steps as a ratio must be at most 1"),
    (["--lr_scheduler", "cosine_with_min_lr"], "--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio"),
])
def test_bad_combinations_are_one_line_errors(extra, message, models, data, meta, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_script(train_network.main, script_args("train_network", models, data, meta, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("value", ["2.5", "ten"])
def test_bad_step_count_is_an_argparse_error(value, models, data, meta, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_script(train_network.main, script_args("train_network", models, data, meta, tmp_path / "out",
                                                   "--lr_warmup_steps", value))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: argument --lr_warmup_steps: '{value}'"), err
