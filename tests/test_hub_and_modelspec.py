"""The later ``--metadata_*`` options (modelspec keys of LoRA, embedding and DreamBooth files) and the Hugging Face
upload / resume options, end to end: training runs upload to a local HTTP server that speaks the Hub API
huggingface_hub calls (tests/hub_server.py), and the files that arrive are compared with the local ones."""

from __future__ import annotations

import base64
import logging

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.training.hub_resume import ResumeSource, parse_resume_spec
from tests.hub_server import HubServer, Repo
from tests.train_util import make_dataset, run_script

TOKEN = "hf_SECRETtoken123"
EXTRA = {"--metadata_usage_hint": "use sks dog", "--metadata_merged_from": "a, b",
         "--metadata_trigger_phrase": "sks dog", "--metadata_preprocessor": "none",
         "--metadata_is_negative_embedding": "false"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, captions={0: "sks dog, sitting", 1: "sks dog, running"})


@pytest.fixture(scope="module")
def thumbnail(tmp_path_factory):
    path = tmp_path_factory.mktemp("thumb") / "thumb.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The local Hub, with huggingface_hub pointed at it (HF_ENDPOINT) and allowed online (conftest sets
    HF_HUB_OFFLINE for the model loaders); downloads go to a per-test cache."""
    import huggingface_hub.constants as hf_constants

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def lora_args(models, data, out, *extra, steps=2):
    return ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def _header(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _extra_args(thumb) -> list[str]:
    return [item for pair in EXTRA.items() for item in pair] + ["--metadata_thumbnail", str(thumb)]


def _assert_extra_fields(meta: dict[str, str], thumbnail_value: str) -> None:
    for option, value in EXTRA.items():
        assert meta[f"modelspec.{option[len('--metadata_'):]}"] == value
    assert meta["modelspec.thumbnail"] == thumbnail_value


# ---- modelspec ------------------------------------------------------------------------------------------


def test_metadata_options_in_lora_header(models, data, tmp_path, thumbnail):
    from train_network import main as train

    out = tmp_path / "out"
    assert run_script(train, lora_args(models, data, out, *_extra_args(thumbnail), steps=1)) == 0
    meta = _header(out / "last.safetensors")
    png = base64.b64encode(thumbnail.read_bytes()).decode()
    _assert_extra_fields(meta, f"data:image/png;base64,{png}")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_metadata_options_in_embedding_header(models, data, tmp_path):
    from train_textual_inversion import main as train

    out = tmp_path / "out"
    url = "data:image/webp;base64,UklGRg=="  # a data URL is written as given
    argv = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--max_train_steps", "1", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--token_string", "zqx", "--init_word", "dog",
            "--save_model_as", "safetensors", *[i for p in EXTRA.items() for i in p], "--metadata_thumbnail", url]
    assert run_script(train, argv) == 0
    meta = _header(out / "zqx.safetensors")
    _assert_extra_fields(meta, url)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"


def test_metadata_options_in_dreambooth_checkpoint(models, data, tmp_path, thumbnail):
    """Whole-model .safetensors carry the full modelspec header, as kohya writes it for checkpoints."""
    from train_db import main as train

    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--max_train_steps", "1", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors", "--output_name", "db",
            "--metadata_author", "Ann", *_extra_args(thumbnail)]
    assert run_script(train, argv) == 0
    meta = _header(out / "db.safetensors")
    _assert_extra_fields(meta, "data:image/png;base64," + base64.b64encode(thumbnail.read_bytes()).decode())
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "db" and meta["modelspec.author"] == "Ann"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.prediction_type"] == "epsilon"


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,fragment", [
    (["--metadata_thumbnail", "/no/such/thumb.png"], "--metadata_thumbnail /no/such/thumb.png: no such file"),
    (["--save_state_to_huggingface"], "--save_state_to_huggingface needs --huggingface_repo_id"),
    (["--huggingface_repo_id", "me/x", "--huggingface_repo_type", "bucket"], "--huggingface_repo_type bucket"),
    (["--huggingface_repo_id", "not a repo"], "--huggingface_repo_id not a repo"),
    (["--resume_from_huggingface"], "--resume_from_huggingface needs --resume"),
    (["--resume_from_huggingface", "--resume", "me/x"], "--resume me/x (--resume_from_huggingface): expected"),
    (["--resume_from_huggingface", "--resume", "me/x/s:main:bucket"], "repository type 'bucket'"),
])
def test_bad_hub_and_metadata_options_are_one_line_errors(models, data, tmp_path, capsys, extra, fragment):
    from train_network import main as train

    code = run_script(train, lora_args(models, data, tmp_path / "out", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_resume_spec_follows_kohya_format():
    assert parse_resume_spec("me/repo/runs/at-state") == ResumeSource("me/repo", "runs/at-state", None, None)
    assert parse_resume_spec("me/repo/s:v1") == ResumeSource("me/repo", "s", "v1", "model")
    assert parse_resume_spec("me/repo/s:v1:dataset") == ResumeSource("me/repo", "s", "v1", "dataset")
    for bad in ("me/repo", "me//s", "me/repo/s:a:b:c", "me/repo/:main"):
        with pytest.raises(ValueError):
            parse_resume_spec(bad)


def test_output_config_never_writes_the_token(models, data, tmp_path):
    from train_network import main as train

    target = tmp_path / "opts.toml"
    argv = lora_args(models, data, tmp_path / "out", "--huggingface_repo_id", "me/lora", "--huggingface_token", TOKEN,
                     "--async_upload", "--output_config", "--config_file", target)
    with pytest.raises(SystemExit) as stop:
        run_script(train, argv)
    assert stop.value.code == 0
    text = target.read_text(encoding="utf-8")
    assert "huggingface_repo_id = \"me/lora\"" in text and "async_upload = true" in text
    assert TOKEN not in text and "huggingface_token" not in text


# ---- upload ----------------------------------------------------------------------------------------------


def test_uploads_every_save_and_state(models, data, tmp_path, hub, caplog):
    from train_network import main as train

    out = tmp_path / "out"
    argv = lora_args(models, data, out, "--save_every_n_steps", "1", "--save_state", "--save_state_to_huggingface",
                     "--huggingface_repo_id", "me/lora", "--huggingface_path_in_repo", "runs/a",
                     "--huggingface_token", TOKEN)
    with caplog.at_level(logging.INFO):
        assert run_script(train, argv) == 0
    files = hub.files("me/lora")
    local = {f"runs/a/{p.relative_to(out).as_posix()}": p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sorted(local) == sorted(files)  # every file of every save and state, nothing else
    assert {name.split("/")[2] for name in files} == {"at-step00000001.safetensors", "at-step00000001-state",
                                                      "last.safetensors", "last-state"}
    assert all(files[name] == data for name, data in local.items())
    assert hub.repos["me/lora"].private  # no --huggingface_repo_visibility public
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}
    assert TOKEN not in caplog.text
    assert all(TOKEN not in value for value in _header(out / "last.safetensors").values())


def test_async_upload_goes_on_while_training(models, data, tmp_path, hub):
    """The first upload is held by the server until the run has gone on to its third save (which removes the
    first locally, --save_last_n_steps 1): only an upload that does not block the training step lets that
    happen. The upload then still sends the whole first file, and the run waits for every upload."""
    from train_network import main as train

    out = tmp_path / "out"
    first = "at-step00000001.safetensors"
    hub.upload_gate = lambda paths: paths != [first] or not (out / first).exists()
    hub.gate_timeout = 30
    argv = lora_args(models, data, out, "--save_every_n_steps", "1", "--save_last_n_steps", "1", "--async_upload",
                     "--huggingface_repo_id", "me/lora", "--huggingface_repo_visibility", "public", steps=4)
    assert run_script(train, argv) == 0
    assert hub.gate_log[0] == ([first], True)  # released by the training going on, not by the timeout
    files = hub.files("me/lora")
    assert sorted(files) == [first, "at-step00000002.safetensors", "at-step00000003.safetensors", "last.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["at-step00000002.safetensors", "at-step00000003.safetensors",
                                                     "last.safetensors"]  # no staging leftovers
    for name in files:
        if name != first:
            assert files[name] == (out / name).read_bytes()
    (tmp_path / first).write_bytes(files[first])
    assert _header(tmp_path / first)["ss_steps"] == "1"  # the whole step-1 file arrived
    assert load_file(str(tmp_path / first)).keys() == load_file(str(out / "last.safetensors")).keys()
    assert not hub.repos["me/lora"].private


def test_unreachable_hub_keeps_the_local_save(models, data, tmp_path, hub, monkeypatch, caplog):
    from train_network import main as train

    with HubServer() as dead:
        url = dead.url
    monkeypatch.setenv("HF_ENDPOINT", url)  # nothing listens there any more
    out = tmp_path / "out"
    argv = lora_args(models, data, out, "--huggingface_repo_id", "me/lora", "--huggingface_token", TOKEN, steps=1)
    with caplog.at_level(logging.INFO):
        assert run_script(train, argv) == 0
    assert (out / "last.safetensors").is_file()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot reach the Hub" in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage() and TOKEN not in caplog.text


# ---- resume ----------------------------------------------------------------------------------------------


def test_resume_from_huggingface_continues_exactly(models, data, tmp_path, hub):
    """4 steps straight == 2 steps, state uploaded, then resumed from the Hub to 4 (bit-identical)."""
    from train_network import main as train

    straight = tmp_path / "straight"
    argv = lora_args(models, data, straight, "--save_every_n_steps", "2", "--save_state",
                     "--save_state_to_huggingface", "--huggingface_repo_id", "me/lora",
                     "--huggingface_path_in_repo", "run", steps=4)
    assert run_script(train, argv) == 0
    assert "run/at-step00000002-state/state.pt" in hub.files("me/lora")
    resumed = tmp_path / "resumed"
    argv = lora_args(models, data, resumed, "--resume", "me/lora/run/at-step00000002-state:main",
                     "--resume_from_huggingface", steps=4)
    assert run_script(train, argv) == 0
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(resumed / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(path.startswith("/me/lora/resolve/main/run/at-step00000002-state/") for _, path, _ in hub.requests)


def test_resume_from_huggingface_missing_state_is_one_line(models, data, tmp_path, hub, capsys):
    from train_network import main as train

    hub.repos["me/empty"] = Repo("model", private=True)
    code = run_script(train, lora_args(models, data, tmp_path / "out", "--resume", "me/empty/state",
                                       "--resume_from_huggingface"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no files under that path" in err[0], err


# ---- the one modelspec builder ---------------------------------------------------------------------------


def test_saved_checkpoints_get_the_builders_whole_model_header(models, tmp_path):
    """library.models.save writes the header the one builder makes (kohya's checkpoint keys, titled with the
    file's stem), not a header of its own; a run's fields replace the title, resolution and free text."""
    import datetime

    from library.models.load import load_model
    from library.models.save import save_model
    from library.modelspec import HeaderFields, modelspec_metadata

    model = load_model(models["sd1"]["safetensors"])
    meta = _header(save_model(model, tmp_path / "plain.safetensors", "safetensors"))
    when = datetime.datetime.fromisoformat(meta["modelspec.date"]).timestamp()
    assert meta == modelspec_metadata(v2=False, v_parameterization=False, adapter=None, title="plain", timestamp=when)
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    fields = HeaderFields(title="Run", resolution=(64, 48), clip_skip=2, user={"author": "Ann", "tags": None})
    meta = _header(save_model(model, tmp_path / "run.safetensors", "safetensors", header=fields))
    assert (meta["modelspec.title"], meta["modelspec.resolution"], meta["modelspec.encoder_layer"],
            meta["modelspec.author"]) == ("Run", "64x48", "2", "Ann")
    assert "modelspec.tags" not in meta


def test_run_fields_take_the_title_from_the_metadata_options_or_the_output_name():
    from types import SimpleNamespace

    from library.modelspec import run_fields
    from library.option_groups import MetadataOptions

    no_data = SimpleNamespace(datasets=[])
    fields = run_fields(MetadataOptions(metadata_license="MIT"), output_name="zqx", clip_skip=None, group=no_data)
    assert fields.title == "zqx" and fields.user["license"] == "MIT" and fields.resolution is None
    titled = run_fields(MetadataOptions(metadata_title="Shown"), output_name="zqx", clip_skip=1, group=no_data)
    assert titled.title == "Shown" and titled.clip_skip == 1
    untitled = run_fields(MetadataOptions(), output_name=None, clip_skip=None, group=no_data)
    header = untitled.header(v2=True, v_parameterization=True, adapter="lora", timestamp=1_700_000_000)
    assert header["modelspec.title"] == "LoRA@1700000000" and header["modelspec.resolution"] == "768x768"
    assert not any(key[len("modelspec."):] in ("author", "license", "thumbnail") for key in header)


def test_network_args_are_recorded_as_the_network_gets_them():
    """ss_network_args holds what parse_network_args gives the network module (spaces around key and value
    removed), also with --no_metadata."""
    import json

    from library.methods.network_metadata import minimal_metadata
    from library.option_groups import NetworkOptions

    meta = minimal_metadata(NetworkOptions(network_module="networks.lora", network_dim=4,
                                           network_args=("conv_dim = 2", "conv_alpha=1")))
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1"
    assert "ss_network_args" not in minimal_metadata(NetworkOptions(network_module="networks.lora"))
