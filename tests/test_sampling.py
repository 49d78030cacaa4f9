"""Sample images during training: the prompt file, the samplers, the images, and that training is untouched."""

from __future__ import annotations

import contextlib
import logging
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.errors import UserError
from library.training.prompts import SAMPLER_NAMES, SamplePrompt, parse_prompts, read_prompt_file
from library.option_groups import Options
from library.training.sampling import (SAMPLER_TABLE, SampleComponents, Sampler, SampleSettings,
                                       build_sample_scheduler, derived_seed, encode_prompt_pair, generate_image,
                                       sample_file_name, sample_settings, to_uint8)
from tests.train_util import make_dataset, run_script
from train_network import build_parser
from train_network import main as train

LONG_PROMPT = " ".join(["dog"] * 100)  # 100 tokens: two 75-token chunks
NAME = re.compile(r"^mylora_(\d{14})_(e\d{6}|\d{6})_(\d{2})(_\d+)?\.png$")


class FakeAccelerator:
    """The parts of accelerate.Accelerator that sampling uses (one CPU process, no trackers)."""

    is_main_process = True
    device = torch.device("cpu")
    trackers: list = []

    def __init__(self):
        self.waits = 0

    def autocast(self):
        return contextlib.nullcontext()

    def wait_for_everyone(self):
        self.waits += 1


def _tiny_model():
    """The tiny SD1 model with a non-zero final-layer-norm bias: the random init gives hidden states of
    exactly zero mean, for which the mean-preserving prompt weighting is 0/0 (real CLIP is not like that)."""
    from library.data.tokens import final_layer_norm
    from library.models.random_model import build_random_model

    model = build_random_model("tiny-sd1", 0)
    with torch.no_grad():
        final_layer_norm(model.text_encoder).bias.fill_(0.05)
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def components(model):
    return SampleComponents(model.unet, model.vae, model.text_encoder, model.tokenizer, False)


def _settings(tmp_path, text, **kw):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return SampleSettings(prompts_file=path, **kw)


# ---- the prompt file ------------------------------------------------------------------------------

def test_prompt_file_syntax_and_defaults():
    text = ("# prompt 1\n\n   \n"
            "masterpiece, 1girl --n low quality, worst quality --w 128 --h 192 --d 1 --l 5.5 --s 28\n"
            "  plain prompt  \n"
            "#a comment --w 64\n"
            "upper case --S 3 --W 64 --N bad --L 1\n"
            "only negative --n\n")
    prompts = parse_prompts(text, "p.txt")
    assert prompts == [
        SamplePrompt(3, "masterpiece, 1girl", "low quality, worst quality", 128, 192, 1, 5.5, 28),
        SamplePrompt(4, "plain prompt", "", 512, 512, None, 7.5, 30),
        SamplePrompt(6, "upper case", "bad", 64, 512, None, 1.0, 3),
        SamplePrompt(7, "only negative", "", 512, 512, None, 7.5, 30)]


@pytest.mark.parametrize("line, message", [
    ("a dog --x 3", "unknown option --x"),
    ("a dog --ss euler", "unknown option --ss"),
    ("a dog --w big", "--w 'big' is not a whole number"),
    ("a dog --h 1.5", "--h '1.5' is not a whole number"),
    ("a dog --h 0", "--h 0 must be a positive"),
    ("a dog --d -1", "--d -1 must be a seed"),
    ("a dog --l much", "--l 'much' is not a number"),
    ("a dog --l nan", "is not a number"),
    ("a dog --s", "--s needs a value"),
    ("a dog --s 2 steps", "--s '2 steps' is not a whole number"),
])
def test_prompt_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# first\n\n{line}\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_prompt_file(path)
    text = str(err.value)
    assert f"{path} line 3" in text and message in text and "\n" not in text


def test_sizes_round_to_8_and_steps_clamp_with_warnings(caplog):
    with caplog.at_level(logging.WARNING):
        (a, b) = parse_prompts("x --w 100 --h 30 --s 0\ny --w 72 --s 5000", "p.txt")
    assert (a.width, a.height, a.steps) == (96, 64, 1) and (b.width, b.steps) == (72, 1000)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "p.txt line 1: --w 100" in warned and "using 96" in warned and "--h 30" in warned
    assert "--s 0" in warned and "--s 5000" in warned and "--w 72" not in warned


def test_prompt_file_problems(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "p.toml").write_text("[[prompt]]\n", encoding="utf-8")
    with pytest.raises(UserError, match="TOML/JSON prompt files are not supported"):
        read_prompt_file(tmp_path / "p.toml")
    (tmp_path / "crlf.txt").write_bytes(b"\xef\xbb\xbf# c\r\na --s 2\r\n")
    assert read_prompt_file(tmp_path / "crlf.txt") == [SamplePrompt(1, "a", steps=2)]


def test_sample_options(tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog\n", encoding="utf-8")
    parse = build_parser().parse_args
    assert sample_settings(Options.from_args(parse([])).sample) is None
    with caplog.at_level(logging.WARNING):
        settings = sample_settings(Options.from_args(parse(
            ["--sample_every_n_steps", "2", "--sample_every_n_epochs", "3", "--sample_prompts", str(prompts),
             "--sample_sampler", "k_euler_a"])).sample)
    assert "--sample_every_n_steps is ignored" in caplog.text
    assert settings == SampleSettings(prompts, None, 3, "k_euler_a", False)
    assert not settings.due(step=3) and settings.due(step=7, epoch=3) and not settings.due(step=7, epoch=2)
    steps = SampleSettings(prompts, every_n_steps=2, at_first=True)
    assert steps.due(step=4) and not steps.due(step=3) and not steps.due(step=4, epoch=1) and steps.due(step=0,
                                                                                                        first=True)
    with pytest.raises(UserError, match="--sample_every_n_steps needs --sample_prompts"):
        sample_settings(Options.from_args(parse(["--sample_every_n_steps", "2"])).sample)
    with pytest.raises(UserError, match="--sample_every_n_epochs 0: must be at least 1"):
        sample_settings(Options.from_args(parse(["--sample_every_n_epochs", "0", "--sample_prompts", str(prompts)])).sample)
    with pytest.raises(SystemExit):
        parse(["--sample_sampler", "nonsense"])


# ---- samplers and images --------------------------------------------------------------------------

def test_sampler_table_follows_the_spec():
    expected = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
                "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
                "dpmsingle": "DPMSolverSinglestepScheduler", "heun": "HeunDiscreteScheduler",
                "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler"}
    expected.update({f"k_{n}": expected[n] for n in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")})
    assert set(SAMPLER_NAMES) == set(expected) == set(SAMPLER_TABLE)
    for name, cls in expected.items():
        for v in (False, True):
            scheduler = build_sample_scheduler(name, v)
            cfg = scheduler.config
            assert type(scheduler).__name__ == cls
            assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (
                1000, 0.00085, 0.012, "scaled_linear")
            assert cfg.prediction_type == ("v_prediction" if v else "epsilon")
    assert build_sample_scheduler("dpmsolver", False).config.algorithm_type == "dpmsolver"
    assert build_sample_scheduler("dpmsolver++", False).config.algorithm_type == "dpmsolver++"


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_writes_a_png(components, tmp_path, sampler):
    settings = _settings(tmp_path, "# c\na photo of a dog --n blurry --w 64 --h 96 --s 2 --d 5\n",
                         every_n_steps=1, sampler=sampler)
    accelerator = FakeAccelerator()
    sampler_ = Sampler(settings=settings, components=components, output_dir=tmp_path / "out", run_seed=1)
    (path,) = sampler_.maybe_sample(accelerator, step=3)
    assert accelerator.waits == 1
    assert re.fullmatch(r"\d{14}_000003_01_5\.png", path.name) and path.parent == tmp_path / "out" / "sample"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (64, 96) and image.mode == "RGB"
    assert list(path.parent.iterdir()) == [path]  # written atomically: no temporary left behind


def test_long_and_weighted_prompts(components):
    pos, neg = encode_prompt_pair(components, LONG_PROMPT, "")
    assert pos.shape == neg.shape == (1, 154, 32)
    short, _ = encode_prompt_pair(components, "a dog on a hill", "")
    weighted, _ = encode_prompt_pair(components, "a (dog:1.5) on a [hill]", "")
    assert short.shape == weighted.shape == (1, 77, 32) and not torch.equal(short, weighted)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images = [generate_image(components, SamplePrompt(0, p, width=64, height=64, steps=2), generator=g(),
                             output_type="latent") for p in ("a dog on a hill", "a (dog:1.5) on a [hill]", LONG_PROMPT)]
    assert all(np.isfinite(i).all() for i in images)
    assert np.abs(images[0] - images[1]).max() > 1e-3 and np.abs(images[0] - images[2]).max() > 1e-3


def test_sampling_leaves_training_state_alone(components, tmp_path):
    settings = _settings(tmp_path, "a dog --s 2 --w 64 --h 64\na cat --s 2 --w 64 --h 64 --d 7\n",
                         every_n_steps=1, sampler="euler_a")
    dropout = torch.nn.Dropout(0.5)
    components.unet.train()
    components.unet.conv_in.eval()
    torch.manual_seed(123)
    random.seed(4)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    sampler = Sampler(settings=settings, components=components, output_dir=tmp_path / "out", run_seed=9,
                      extra_modules=[dropout])
    first = sampler.sample(FakeAccelerator(), step=10)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert components.unet.training and not components.unet.conv_in.training and dropout.training
    assert not components.text_encoder.training
    again = sampler.sample(FakeAccelerator(), step=10)
    later = sampler.sample(FakeAccelerator(), step=11)
    pixels = lambda p: np.asarray(Image.open(p))  # noqa: E731
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, again))  # same step, same images
    assert np.array_equal(pixels(first[1]), pixels(later[1]))  # --d 7: the same at every step
    assert derived_seed(9, 10, 0) != derived_seed(9, 11, 0) != derived_seed(9, 11, 1)
    components.unet.eval()


def test_file_names():
    assert sample_file_name("net", step=12, epoch=None, line_index=3, seed=None,
                            timestamp="20240102030405") == "net_20240102030405_000012_03.png"
    assert sample_file_name(None, step=99, epoch=2, line_index=12, seed=42,
                            timestamp="20240102030405") == "20240102030405_e000002_12_42.png"
    assert to_uint8(np.array([[[0.0, 0.5, 1.2]]])).tolist() == [[[0, 128, 255]]]


# ---- during training ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two LoRA runs on disk-loaded tiny models, one with samples (and TensorBoard) and one without."""
    from library.models.save import save_model

    root = tmp_path_factory.mktemp("sampling")
    tiny = _tiny_model()
    save_model(tiny, root / "tiny-sd1.safetensors", "safetensors")
    save_model(tiny, root / "tiny-sd1", "diffusers_safetensors")
    data = make_dataset(root / "data", captions={0: "sks dog, sitting", 1: "sks dog, running"})
    prompts = root / "prompts.txt"
    prompts.write_text(f"# samples\n\na dog --n cat --w 64 --h 96 --d 3 --s 3\n\n(sks:1.3) dog, [grass] --s 2 --w 64 "
                       f"--h 64 --l 5\n{LONG_PROMPT} --s 2 --w 64 --h 64\n", encoding="utf-8")

    def args(out, *extra):
        return ["--pretrained_model_name_or_path", root / "tiny-sd1.safetensors", "--train_data_dir", data,
                "--resolution", "64", "--output_dir", out, "--output_name", "mylora", "--network_module",
                "networks.lora", "--network_dim", "4", "--max_train_steps", "4", "--learning_rate", "1e-2",
                "--seed", "1", "--max_data_loader_n_workers", "0", "--network_dropout", "0.2", *extra]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDTRAIN_CACHE_DIR", str(root / "cache"))
        assert run_script(train, args(root / "plain")) == 0
        assert run_script(train, args(root / "sampled", "--sample_every_n_steps", "2", "--sample_at_first",
                                      "--sample_prompts", prompts, "--sample_sampler", "euler_a",
                                      "--logging_dir", root / "logs")) == 0
    return root


def test_training_with_samples_is_bit_identical(trained):
    a = load_file(str(trained / "plain" / "mylora.safetensors"))
    b = load_file(str(trained / "sampled" / "mylora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (trained / "plain" / "sample").exists()


def test_sample_files_and_tensorboard(trained):
    names = sorted(p.name for p in (trained / "sampled" / "sample").iterdir())
    found = sorted((m.group(2), m.group(3), m.group(4)) for m in map(NAME.match, names) if m)
    assert len(found) == len(names) == 9
    assert found == sorted((step, line, "_3" if line == "02" else None)
                           for step in ("000000", "000002", "000004") for line in ("02", "04", "05"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (trained / "logs").iterdir()
    events = EventAccumulator(str(next(p.parent for p in run.rglob("events.out.tfevents.*"))))
    events.Reload()
    assert {"sample_02", "sample_04", "sample_05"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("sample_02")] == [0, 2, 4]


def test_lora_sample_equals_diffusers_with_the_saved_lora(trained):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from library.models.load import load_model
    from networks.lora import create_network_from_weights

    lora = trained / "sampled" / "mylora.safetensors"
    prompt = SamplePrompt(2, "a dog", "cat", width=64, height=96, seed=3, steps=3)
    pipe = StableDiffusionPipeline.from_pretrained(str(trained / "tiny-sd1"), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = build_sample_scheduler("euler_a", False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora))

    def reference(output_type):
        return pipe(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt, width=64, height=96,
                    num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
                    output_type=output_type).images[0]

    # the PNG written during training at the last step (the final weights) is diffusers' image
    (png,) = (trained / "sampled" / "sample").glob("mylora_*_000004_02_3.png")
    assert np.abs(np.asarray(Image.open(png), dtype=int) - to_uint8(reference("np")).astype(int)).max() <= 1
    # and in latent space: ours with the LoRA applied == diffusers' with it; without it they differ
    ours = load_model(trained / "tiny-sd1.safetensors")
    parts = SampleComponents(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer, False)
    without = generate_image(parts, prompt, sampler="euler_a", generator=torch.Generator().manual_seed(3),
                             output_type="latent")
    network, weights = create_network_from_weights(1.0, str(lora), ours.vae, ours.text_encoder, ours.unet)
    network.apply_to(ours.text_encoder, ours.unet)
    network.load_state_dict(weights)
    with_lora = generate_image(parts, prompt, sampler="euler_a", generator=torch.Generator().manual_seed(3),
                               output_type="latent")
    expected = reference("latent").float().numpy()
    assert np.abs(with_lora - expected).max() < 1e-4
    assert np.abs(with_lora - without).max() > 1e-2


def test_epoch_cadence_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    from library.models.save import save_model

    save_model(_tiny_model(), tmp_path / "m.safetensors", "safetensors")
    data = make_dataset(tmp_path / "data", folder="1_sks dog", count=2)
    (tmp_path / "p.txt").write_text("a dog --s 1 --w 64 --h 64\n", encoding="utf-8")
    argv = ["--pretrained_model_name_or_path", tmp_path / "m.safetensors", "--train_data_dir", data, "--resolution",
            "64", "--output_dir", tmp_path / "out", "--network_module", "networks.lora", "--max_train_epochs", "2",
            "--seed", "1", "--max_data_loader_n_workers", "0", "--sample_every_n_steps", "1",
            "--sample_every_n_epochs", "1", "--sample_prompts", tmp_path / "p.txt"]
    assert run_script(train, argv) == 0
    names = sorted(p.name.split("_", 1)[1] for p in (tmp_path / "out" / "sample").iterdir())
    assert names == ["e000001_00.png", "e000002_00.png"]


def test_bad_prompt_file_stops_before_training(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("ok\na dog --q 3\n", encoding="utf-8")
    argv = ["--pretrained_model_name_or_path", tmp_path / "none.safetensors", "--train_data_dir", tmp_path,
            "--output_dir", tmp_path / "out", "--network_module", "networks.lora", "--sample_every_n_steps", "5",
            "--sample_prompts", tmp_path / "p.txt"]
    assert run_script(train, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --sample_prompts {tmp_path / 'p.txt'} line 2: unknown option --q (known: --n --w --h " \
                      "--d --l --s)"


@pytest.mark.slow
def test_two_processes_sample_once_and_agree(tmp_path):
    """accelerate launch with 2 CPU processes: only the main process writes samples; training goes on."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from library.models.save import save_model

    repo = Path(__file__).resolve().parent.parent
    save_model(_tiny_model(), tmp_path / "m.safetensors", "safetensors")
    data = make_dataset(tmp_path / "data", folder="2_sks dog", count=3)
    (tmp_path / "p.txt").write_text("a dog --s 2 --w 64 --h 64\nsks dog --s 2 --w 64 --h 64 --d 4\n",
                                    encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(repo / "train_network.py"), "--pretrained_model_name_or_path",
           str(tmp_path / "m.safetensors"), "--train_data_dir", str(data), "--resolution", "64", "--output_dir", str(tmp_path / "out"),
           "--network_module", "networks.lora", "--max_train_epochs", "2", "--seed", "1",
           "--max_data_loader_n_workers", "0", "--sample_every_n_epochs", "1", "--sample_at_first",
           "--sample_prompts", str(tmp_path / "p.txt")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1",
               SDTRAIN_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name.split("_", 1)[1] for p in (tmp_path / "out" / "sample").iterdir())
    assert names == ["000000_00.png", "000000_01_4.png", "e000001_00.png", "e000001_01_4.png", "e000002_00.png",
                     "e000002_01_4.png"]
