"""kohya's start-step, state and logging options end to end on the tiny SD1 model: --initial_step /
--initial_epoch / --skip_until_initial_step, --save_state_on_train_end, --max_validation_steps,
--console_log_*, --log_config, --log_tracker_config, --wandb_run_name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.train_util import make_dataset, read_record, record_args, run_script
from train_network import build_parser, main as train
from library.option_groups import Options


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 images, 1 repeat: 4 batches per epoch at batch size 1."""
    return make_dataset(tmp_path_factory.mktemp("data"), folder="1_sks dog", count=4)


def base_args(models, data, out, *extra, steps=10):
    return ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def trained_keys(record: Path) -> dict[int, list[str]]:
    """The image keys every epoch trained, in order (the run's --record_training_dir record)."""
    return {epoch: [Path(k).name for k in keys] for epoch, keys in read_record(record)["keys"].items()}


def recorded_run(models, data, tmp_path, name, *extra, steps=10) -> dict[int, list[str]]:
    """Train run ``name`` with a --record_training_dir record; the image keys every epoch trained."""
    record = tmp_path / f"record_{name}"
    assert run_script(train, base_args(models, data, tmp_path / name, *extra, *record_args(record), steps=steps)) == 0
    return trained_keys(record)


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def scalars(logs: Path, tag: str) -> dict[int, float]:
    """One scalar of the TensorBoard event files under ``logs``: {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for run in {p.parent for p in logs.rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(run))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return values


def hparams(logs: Path) -> dict[str, object] | None:
    """The hparams TensorBoard recorded under ``logs`` (None when there are none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for run in {p.parent for p in logs.rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(run))
        events.Reload()
        try:
            content = events.PluginTagToContent("hparams")
        except KeyError:
            continue
        info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                for k, v in info.session_start_info.hparams.items()}
    return None


# ---- --initial_step / --initial_epoch / --skip_until_initial_step ------------------------------------------


def test_initial_step_starts_the_counters_but_not_the_lr_schedule(models, data, tmp_path):
    """--initial_step 5 of 10 (4 steps per epoch): the run trains steps 6..10, starting with epoch 2's first
    batch; step saves at 6 and 9, the epoch-2 save after its 4 batches (step 9), ss_steps / ss_epoch count
    from there; the linear schedule starts at its beginning (lr after the first step = 0.9 × lr)."""
    full = recorded_run(models, data, tmp_path, "full")
    logs = tmp_path / "logs"
    keys = recorded_run(models, data, tmp_path, "out", "--initial_step", "5", "--save_every_n_steps", "3",
                        "--save_every_n_epochs", "1", "--lr_scheduler", "linear", "--logging_dir", logs)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["at-step00000006.safetensors", "at-step00000009.safetensors",
                                                    "epoch-000002.safetensors", "last.safetensors"]
    assert keys == {2: full[2], 3: full[3][:1]}  # epoch 2 from its first batch, then one step of epoch 3
    assert metadata(out / "at-step00000006.safetensors")["ss_steps"] == "6"
    assert (metadata(out / "epoch-000002.safetensors")["ss_steps"], metadata(out / "epoch-000002.safetensors")[
        "ss_epoch"]) == ("9", "2")
    assert (metadata(out / "last.safetensors")["ss_steps"], metadata(out / "last.safetensors")["ss_epoch"]) == \
        ("10", "3")
    lr = scalars(logs, "lr/unet")
    assert sorted(lr) == list(range(6, 11))
    assert lr[6] == pytest.approx(0.9e-3) and lr[10] == pytest.approx(0.5e-3)  # not 0.4e-3 .. 0 (advanced)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_skip_until_initial_step_trains_the_tail_of_the_uninterrupted_run(models, data, tmp_path, accumulation):
    """With --skip_until_initial_step the run trains exactly the batches an uninterrupted run trains after the
    initial step, in the same order (here from inside epoch 2), with gradient accumulation too."""
    ga = ["--gradient_accumulation_steps", str(accumulation)]
    steps, start = (10, 5) if accumulation == 1 else (5, 3)  # 4 or 2 steps per epoch
    full = recorded_run(models, data, tmp_path, "full", *ga, steps=steps)
    skipped = recorded_run(models, data, tmp_path, "out", *ga, "--initial_step", str(start),
                           "--skip_until_initial_step", "--save_every_n_epochs", "1", steps=steps)
    position = start * accumulation - 4  # batches of epoch 2 before the initial step
    assert skipped == {2: full[2][position:], 3: full[3]}
    epoch_end = 8 if accumulation == 1 else 4
    assert metadata(tmp_path / "out" / "epoch-000002.safetensors")["ss_steps"] == str(epoch_end)
    assert metadata(tmp_path / "out" / "last.safetensors")["ss_steps"] == str(steps)


def test_initial_epoch_is_a_step_count_of_whole_epochs(models, data, tmp_path):
    """--initial_epoch 3 = --initial_step 8 (4 steps per epoch): epoch 3 from its first batch."""
    full = recorded_run(models, data, tmp_path, "full")
    keys = recorded_run(models, data, tmp_path, "out", "--initial_epoch", "3", "--save_every_n_steps", "9")
    assert keys == {3: full[3]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["at-step00000009.safetensors",
                                                                    "last.safetensors"]


def test_resume_with_initial_step_and_skip_continues_exactly(models, data, tmp_path):
    """A state saved at step 5, resumed with --initial_step 5 --skip_until_initial_step, gives the
    uninterrupted run's weights bit for bit; without the skip it trains epoch 2 from its start (other
    weights), and --initial_step replaces the state's own position."""
    assert run_script(train, base_args(models, data, tmp_path / "full")) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", "--save_every_n_steps", "5",
                                       "--save_state", steps=5)) == 0
    state = tmp_path / "b" / "last-state"
    assert json.loads((state / "state.json").read_text())["global_step"] == 5
    full = load_file(str(tmp_path / "full" / "last.safetensors"))
    for name, skip in (("skip", ["--skip_until_initial_step"]), ("no_skip", [])):
        argv = base_args(models, data, tmp_path / name, "--resume", state, "--initial_step", "5", *skip)
        assert run_script(train, argv) == 0
        weights = load_file(str(tmp_path / name / "last.safetensors"))
        same = all(torch.equal(full[k], weights[k]) for k in full)
        assert same == bool(skip), name


@pytest.mark.parametrize("extra, expected", [
    (["--initial_step", "10"], "--initial_step / --initial_epoch start at step 10, but the run ends at "
                               "--max_train_steps 10"),
    (["--initial_epoch", "4"], "start at step 12, but the run ends at --max_train_steps 10"),
    (["--initial_epoch", "0"], "--initial_epoch must be at least 1, got 0"),
    (["--initial_step", "-1"], "--initial_step must be at least 0, got -1"),
    (["--max_validation_steps", "0"], "--max_validation_steps must be at least 1, got 0"),
])
def test_start_step_mistakes_are_one_line_errors(models, data, tmp_path, capsys, extra, expected):
    assert run_script(train, base_args(models, data, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_record_training_dir_refuses_a_file_or_an_earlier_record(models, data, tmp_path, capsys):
    """--record_training_dir writes a new record only: a file, or a folder holding a record, is one line, exit 2,
    before training (the earlier record is left as it was)."""
    record = tmp_path / "record"
    assert run_script(train, base_args(models, data, tmp_path / "a", *record_args(record), steps=2)) == 0
    before = {p.name: p.read_bytes() for p in record.iterdir()}
    assert sorted(before) == ["rank0.pt", "startup-image_headers-rank0.jsonl", "timesteps-rank0.jsonl"]  # the
    # start-up record: this process scanned the image sizes (no latent cache in this run)
    assert sum(len(read_record(record)["keys"][e]) for e in read_record(record)["keys"]) == 2  # batch size 1
    a_file = tmp_path / "file.txt"
    a_file.write_text("x", encoding="utf-8")
    for folder, expected in ((record, "already holds a training record (rank0.pt)"), (a_file, "is a file")):
        capsys.readouterr()
        assert run_script(train, base_args(models, data, tmp_path / "b", *record_args(folder), steps=2)) == 2
        err = capsys.readouterr().err
        assert f"--record_training_dir {folder}: {expected}" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in record.iterdir()} == before and not (tmp_path / "b").exists()


# ---- --save_state_on_train_end ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["network", "db"])
def test_save_state_on_train_end_writes_only_the_final_state(models, data, tmp_path, script):
    """Step saves at 2 without states; last-state at the end, resumable (its step is the run's end); the dry
    run lists it."""
    if script == "network":
        main, argv = train, base_args(models, data, tmp_path / "out", steps=4)
    else:
        from train_db import main

        argv = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
                "--resolution", "64", "--output_dir", tmp_path / "out", "--max_train_steps", "4", "--seed", "1",
                "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors"]
    argv += ["--save_every_n_steps", "2", "--save_state_on_train_end"]
    report = tmp_path / "plan.json"
    assert run_script(main, [*argv, "--dry_run_json", report]) == 0
    planned = {s["name"]: s["kind"] for s in json.loads(report.read_text())["outputs"]["saves"]}
    assert run_script(main, argv) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["at-step00000002.safetensors", "last-state",
                                                    "last.safetensors"]
    assert json.loads((out / "last-state" / "state.json").read_text())["global_step"] == 4
    assert planned.get("last-state/") == "final state" and "at-step00000002-state/" not in planned


# ---- --max_validation_steps ------------------------------------------------------------------------------


def _validation_config(path: Path, train_dir: Path, val_dir: Path, batch_size: int) -> Path:
    path.write_text(f"""[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = '{train_dir}'
class_tokens = 'sks dog'
[[datasets]]
resolution = 64
batch_size = {batch_size}
is_validation = true
[[datasets.subsets]]
image_dir = '{val_dir}'
class_tokens = 'sks dog'
""", encoding="utf-8")
    return path


def test_max_validation_steps_uses_the_first_n_validation_batches(models, data, tmp_path):
    """4 held-out images in batches of 2: --max_validation_steps 1 logs the mean loss of one batch (2 images):
    the mean of two of the single-image losses (each measured with that image alone as validation set),
    while the whole set gives the mean of all four."""
    held = make_dataset(tmp_path / "held", folder="val", count=4) / "val"
    images = sorted(held.glob("*.png"))

    def step0_loss(name: str, val_dir: Path, *extra: str) -> float:
        config = _validation_config(tmp_path / f"{name}.toml", data / "1_sks dog", val_dir, batch_size=2)
        argv = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--dataset_config", config,
                "--output_dir", tmp_path / name, "--network_module", "networks.lora", "--max_train_steps", "1",
                "--seed", "1", "--max_data_loader_n_workers", "0", "--logging_dir", tmp_path / f"logs_{name}",
                *extra]
        assert run_script(train, argv) == 0
        return scalars(tmp_path / f"logs_{name}", "loss/validation")[0]

    singles = []
    for image in images:
        alone = tmp_path / f"alone_{image.stem}"
        alone.mkdir()
        shutil.copy(image, alone / image.name)  # same file name: same fixed noise
        singles.append(step0_loss(f"single_{image.stem}", alone))
    assert step0_loss("all", held) == pytest.approx(sum(singles) / 4, rel=1e-5)
    limited = step0_loss("limited", held, "--max_validation_steps", "1")
    pairs = [(singles[i] + singles[j]) / 2 for i in range(4) for j in range(i + 1, 4)]
    assert any(limited == pytest.approx(p, rel=1e-5) for p in pairs), (limited, pairs)
    assert limited != pytest.approx(sum(singles) / 4, rel=1e-5)
    assert step0_loss("more", held, "--max_validation_steps", "5") == pytest.approx(sum(singles) / 4, rel=1e-5)


# ---- console log ------------------------------------------------------------------------------------------


def test_console_log_file_gets_the_run_log_at_the_chosen_level(models, data, tmp_path):
    info, error, simple = tmp_path / "info.log", tmp_path / "logs" / "error.log", tmp_path / "simple.log"
    info.write_text("kept line\n", encoding="utf-8")  # appended to, never replaced
    assert run_script(train, base_args(models, data, tmp_path / "a", "--console_log_file", info, steps=2)) == 0
    text = info.read_text(encoding="utf-8")
    assert text.startswith("kept line\n")
    assert "INFO library.training.session: running training (networks.lora, dim 4)" in text
    assert f"INFO library.training.trainer: saved {tmp_path / 'a' / 'last.safetensors'}" in text
    assert run_script(train, base_args(models, data, tmp_path / "b", "--console_log_file", error,
                                       "--console_log_level", "ERROR", steps=2)) == 0
    assert error.is_file() and "INFO" not in error.read_text(encoding="utf-8") \
        and "saved" not in error.read_text(encoding="utf-8")
    assert run_script(train, base_args(models, data, tmp_path / "c", "--console_log_file", simple,
                                       "--console_log_simple", "--console_log_level", "DEBUG", steps=2)) == 0
    lines = simple.read_text(encoding="utf-8").splitlines()
    assert f"saved {tmp_path / 'c' / 'last.safetensors'}" in lines and not any(l.startswith("INFO ") for l in lines)


def test_console_log_file_that_is_a_folder_is_a_one_line_error(models, data, tmp_path, capsys):
    assert run_script(train, base_args(models, data, tmp_path / "out", "--console_log_file", tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"--console_log_file {tmp_path}: is a folder" in err and err.count("\n") == 1, err


# ---- trackers: --log_config, --log_tracker_config, --wandb_run_name ---------------------------------------


def test_log_config_writes_the_options_without_secrets_into_tensorboard(models, data, tmp_path):
    logs = tmp_path / "logs"
    assert run_script(train, base_args(models, data, tmp_path / "out", "--logging_dir", logs, "--log_config",
                                       "--wandb_api_key", "secret-key", "--training_comment", "hello",
                                       steps=1)) == 0
    recorded = hparams(logs)
    assert recorded is not None
    assert recorded["network_dim"] == 4 and recorded["learning_rate"] == pytest.approx(1e-3)
    assert recorded["training_comment"] == "hello" and recorded["network_module"] == "networks.lora"
    for hidden in ("wandb_api_key", "pretrained_model_name_or_path", "train_data_dir", "output_dir", "logging_dir"):
        assert hidden not in recorded
    assert "secret-key" not in "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())
    plain = tmp_path / "plain_logs"
    assert run_script(train, base_args(models, data, tmp_path / "plain", "--logging_dir", plain, steps=1)) == 0
    assert hparams(plain) is None and scalars(plain, "loss/current")


def test_tracker_init_kwargs_from_file_and_run_name(tmp_path):
    """What init_trackers receives (wandb itself needs a login): the file's tables, --wandb_run_name as
    wandb.name unless the file names the run; no config without --log_config."""
    from library.training.tracker_config import tracker_start

    config = tmp_path / "trackers.toml"
    config.write_text("[wandb]\nentity = 'me'\ntags = ['lora']\n[tensorboard]\nflush_secs = 7\n", encoding="utf-8")
    common = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "out"]
    def start_of(argv):
        opts = Options.from_args(build_parser().parse_args([*common, *argv]))
        return tracker_start(opts.logging, opts.command_line())

    start = start_of(["--log_tracker_config", str(config), "--wandb_run_name", "run-1"])
    assert start.init_kwargs == {"wandb": {"entity": "me", "tags": ["lora"], "name": "run-1"},
                                 "tensorboard": {"flush_secs": 7}}
    assert start.config is None
    config.write_text("[wandb]\nname = 'from-file'\n", encoding="utf-8")
    start = start_of(["--log_tracker_config", str(config), "--wandb_run_name", "run-1", "--log_config",
                      "--wandb_api_key", "k"])
    assert start.init_kwargs == {"wandb": {"name": "from-file"}}
    assert start.config["log_config"] is True and "wandb_api_key" not in start.config
    assert start_of(["--wandb_run_name", "only"]).init_kwargs == {"wandb": {"name": "only"}}


@pytest.mark.parametrize("body, expected", [
    ("[wandb\nname = 'x'\n", "not valid TOML"),
    ("name = 'x'\n", "unknown table [name]; allowed: [tensorboard], [wandb]"),
    ("wandb = 3\n", "'wandb' must be a table"),
    ("[tensorboard]\nlogdir_x = 1\n", "[tensorboard] logdir_x is not an argument of SummaryWriter"),
])
def test_bad_log_tracker_config_is_a_one_line_error(models, data, tmp_path, capsys, body, expected):
    config = tmp_path / "trackers.toml"
    config.write_text(body, encoding="utf-8")
    argv = base_args(models, data, tmp_path / "out", "--logging_dir", tmp_path / "logs", "--log_tracker_config",
                     config)
    assert run_script(train, argv) == 2
    err = capsys.readouterr().err
    assert f"--log_tracker_config {config}: {expected}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written
