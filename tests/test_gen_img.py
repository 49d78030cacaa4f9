"""gen_img_diffusers.py end to end on the tiny models: an image equals the sample that training made with the
same LoRA / embedding, seed and settings (pixel for pixel); several LoRAs; embeddings; names, metadata and
batches; and every bad input is one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen_img_diffusers import main as gen
from library.training.prompts import SAMPLER_NAMES
from tests.train_util import make_dataset, run_script

REPO = Path(__file__).resolve().parent.parent
SAMPLE_PROMPTS = ("# samples made during training\n"
                  "a dog, sitting --n cat --w 64 --h 64 --d 3 --s 3 --l 6\n"
                  "sks dog --w 64 --h 96 --d 5 --s 2\n")
PROMPT = "a dog, sitting --n cat"
IMAGE = ["--W", "64", "--H", "64", "--steps", "3", "--scale", "6", "--seed", "3"]


def pixels(path: Path) -> np.ndarray:
    """The PNG as an int array (H, W, 3)."""
    return np.asarray(Image.open(path), dtype=np.int64)


def random_lora(model_file: Path, out: Path, seed: int) -> Path:
    """A LoRA (UNet only, rank 2) with random non-zero weights: a strong, known-different second network."""
    from library.models.load import load_model
    from networks.lora import create_network

    model = load_model(model_file)
    torch.manual_seed(seed)
    network = create_network(1.0, 2, 2, model.vae, None, model.unet)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.normal_(0, 0.5)
    network.save_weights(out)
    return out


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    """A LoRA trained 2 steps with samples at step 2 (euler_a), a random second LoRA, and a Textual
    Inversion embedding trained 2 steps with samples."""
    from train_network import main as train_network
    from train_textual_inversion import main as train_ti

    root = tmp_path_factory.mktemp("gen_img")
    model = models["sd1"]["safetensors"]
    data = make_dataset(root / "data", captions={0: "sks dog, sitting", 1: "sks dog, running"})
    ti_data = make_dataset(root / "ti_data", folder="3_zqx", captions={0: "a zqx on grass", 1: "zqx, running"})
    prompts = root / "prompts.txt"
    prompts.write_text(SAMPLE_PROMPTS, encoding="utf-8")
    ti_prompts = root / "ti_prompts.txt"
    ti_prompts.write_text("a zqx on grass --n dog --w 64 --h 64 --d 7 --s 3\n", encoding="utf-8")
    common = ["--pretrained_model_name_or_path", model, "--resolution", "64", "--max_train_steps", "2",
              "--learning_rate", "1e-2", "--seed", "1", "--max_data_loader_n_workers", "0",
              "--sample_every_n_steps", "2", "--sample_sampler", "euler_a"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDTRAIN_CACHE_DIR", str(root / "cache"))
        assert run_script(train_network, [*common, "--train_data_dir", data, "--output_dir", root / "lora",
                                          "--output_name", "a", "--network_module", "networks.lora",
                                          "--network_dim", "4", "--sample_prompts", prompts]) == 0
        assert run_script(train_ti, [*common, "--train_data_dir", ti_data, "--output_dir", root / "ti",
                                     "--token_string", "zqx", "--init_word", "dog", "--num_vectors_per_token", "2",
                                     "--save_model_as", "safetensors", "--sample_prompts", ti_prompts]) == 0
    return {"root": root, "model": model, "prompts": prompts, "a": root / "lora" / "a.safetensors",
            "b": random_lora(model, root / "b.safetensors", seed=5), "ti": root / "ti" / "zqx.safetensors",
            "samples": root / "lora" / "sample", "ti_samples": root / "ti" / "sample"}


def generate(out: Path, *args) -> list[Path]:
    """Run gen_img_diffusers.py in-process; the PNGs it wrote, in name order."""
    before = set(out.glob("*.png")) if out.exists() else set()
    assert run_script(gen, ["--outdir", out, *args]) == 0
    return sorted(set(out.glob("*.png")) - before)


def with_lora(trained, *extra):
    return ["--ckpt", trained["model"], "--sampler", "euler_a", "--network_module", "networks.lora",
            "--network_weights", trained["a"], *extra]


# ---- the same image as training ------------------------------------------------------------------

def test_lora_image_equals_the_training_sample(trained, tmp_path):
    """Same base model, LoRA, prompt, seed, steps, sampler, size and scale: identical pixels (max diff 0)."""
    (sample,) = trained["samples"].glob("a_*_000002_01_3.png")
    (image,) = generate(tmp_path / "one", *with_lora(trained, "--prompt", PROMPT, *IMAGE))
    assert image.name == "000000_3.png"
    assert np.array_equal(pixels(image), pixels(sample))
    # the whole prompt file, with its per-line options, gives every training sample
    images = generate(tmp_path / "file", *with_lora(trained, "--from_file", trained["prompts"]))
    assert [p.name for p in images] == ["000000_3.png", "000001_5.png"]
    (tall,) = trained["samples"].glob("a_*_000002_02_5.png")
    assert pixels(images[1]).shape == (96, 64, 3)
    assert np.array_equal(pixels(images[0]), pixels(sample)) and np.array_equal(pixels(images[1]), pixels(tall))
    # and the LoRA matters: without it the image is another one
    (plain,) = generate(tmp_path / "plain", "--ckpt", trained["model"], "--sampler", "euler_a", "--prompt", PROMPT,
                        *IMAGE)
    assert not np.array_equal(pixels(plain), pixels(sample))


def test_embedding_image_equals_the_training_sample(trained, tmp_path):
    """A 2-vector Textual Inversion embedding: the token 'zqx' (the file name) expands to 'zqx zqx1'."""
    (sample,) = trained["ti_samples"].glob("zqx_*_000002_00_7.png")
    args = ["--ckpt", trained["model"], "--sampler", "euler_a", "--prompt", "a zqx on grass --n dog --d 7",
            "--W", "64", "--H", "64", "--steps", "3"]
    (image,) = generate(tmp_path / "ti", *args, "--textual_inversion_embeddings", trained["ti"])
    assert np.array_equal(pixels(image), pixels(sample))
    (without,) = generate(tmp_path / "plain", *args)
    assert not np.array_equal(pixels(without), pixels(sample))


def test_embedding_layouts_give_the_same_image(trained, tmp_path):
    """The same vectors as kohya .pt ({"emb_params"}) and AUTOMATIC1111 .pt (string_to_param) files."""
    from safetensors.torch import load_file

    from library.methods.textual_inversion import write_embedding_file

    vectors = load_file(str(trained["ti"]))["emb_params"]
    a1111 = write_embedding_file(tmp_path / "a1111" / "zqx.pt", vectors, "pt", token_string="zqx", step=2)
    kohya = tmp_path / "kohya" / "zqx.pt"
    kohya.parent.mkdir()
    torch.save({"emb_params": vectors}, kohya)
    args = ["--ckpt", trained["model"], "--prompt", "zqx --d 1", "--W", "64", "--H", "64", "--steps", "2"]
    images = [pixels(generate(tmp_path / name, *args, "--textual_inversion_embeddings", path)[0])
              for name, path in (("st", trained["ti"]), ("a1111", a1111), ("kohya", kohya))]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])


# ---- several networks ------------------------------------------------------------------------------

def test_several_loras_with_multipliers(trained, tmp_path):
    base = ["--ckpt", trained["model"], "--sampler", "euler_a", "--prompt", PROMPT, *IMAGE]
    lora = ["--network_module", "networks.lora", "networks.lora", "--network_weights", trained["a"], trained["b"]]

    def image(name, *args):
        return pixels(generate(tmp_path / name, *base, *args)[0])

    plain = image("plain")
    a_only = image("a", "--network_module", "networks.lora", "--network_weights", trained["a"])
    both = image("both", *lora, "--network_mul", "0.7", "1.3")
    both_other = image("both2", *lora, "--network_mul", "1.0", "0.5")
    off = image("off", *lora, "--network_mul", "0", "0")
    a_alone = image("a_alone", *lora, "--network_mul", "1", "0")
    assert np.array_equal(off, plain)  # multiplier 0 is the plain model, exactly
    assert np.array_equal(a_alone, a_only)  # and switches one network off
    for x, y in ((plain, a_only), (a_only, both), (plain, both), (both, both_other)):
        assert np.abs(x - y).max() > 0
    assert np.abs(both - plain).mean() > 1  # the random second LoRA changes the image a lot


# ---- names, metadata, batches --------------------------------------------------------------------

def test_names_metadata_and_batches(trained, tmp_path):
    out = tmp_path / "out"
    first = generate(out, *with_lora(trained, "--prompt", "a cat --n dog", "--W", "64", "--H", "64", "--steps",
                                     "2", "--seed", "10", "--images_per_prompt", "3", "--batch_size", "2",
                                     "--network_mul", "0.8", "--clip_skip", "2"))
    assert [p.name for p in first] == ["000000_10.png", "000001_11.png", "000002_12.png"]
    text = Image.open(first[1]).text
    assert {k: text[k] for k in ("prompt", "negative-prompt", "seed", "steps", "sampler", "width", "clip-skip")} == {
        "prompt": "a cat", "negative-prompt": "dog", "seed": "11", "steps": "2", "sampler": "euler_a",
        "width": "64", "clip-skip": "2"}
    assert '"multiplier": 0.8' in text["networks"] and "Seed: 11, Size: 64x64" in text["parameters"]
    saved = {p: p.read_bytes() for p in first}
    # a second run continues the numbering and leaves the earlier files alone; one at a time (batch 1)
    again = generate(out, *with_lora(trained, "--prompt", "a cat --n dog", "--W", "64", "--H", "64", "--steps",
                                     "2", "--seed", "11", "--network_mul", "0.8", "--clip_skip", "2"))
    assert [p.name for p in again] == ["000003_11.png"]
    assert all(p.read_bytes() == data for p, data in saved.items())
    # the image of seed 11 from a batch of two is that of seed 11 alone (bound: one 8-bit level; 0 measured on CPU)
    assert np.abs(pixels(again[0]) - pixels(first[1])).max() <= 1
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))  # seeds 10 and 11 differ


def test_sd2_v_model_and_bf16(models, tmp_path):
    """An SD2 v-prediction diffusers folder with --v2 --v_parameterization; --bf16 stays close to fp32."""
    args = ["--ckpt", models["sd2"]["diffusers"], "--v2", "--v_parameterization", "--prompt", "a dog --d 2",
            "--W", "64", "--H", "64", "--steps", "2", "--sampler", "dpmsolver++", "--sdpa", "--xformers"]
    (fp32,) = generate(tmp_path / "fp32", *args)
    (bf16,) = generate(tmp_path / "bf16", *args, "--bf16")
    (eps,) = generate(tmp_path / "eps", *args[:3], *args[4:])
    assert pixels(fp32).shape == (64, 64, 3)
    assert 0 < np.abs(pixels(fp32) - pixels(bf16)).mean() < 6  # 3.5 measured (of 255)
    assert not np.array_equal(pixels(fp32), pixels(eps))  # the prediction type is used


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case,message", [
    ("no_model", "--ckpt {root}/missing.safetensors: no such file or folder"),
    ("no_lora", "--network_weights {root}/missing.safetensors: no such file"),
    ("counts", "--network_module is given 1 time(s) but --network_weights 2"),
    ("muls", "--network_mul has 2 value(s) for 1 network(s)"),
    ("sampler", "--sampler k_dpmpp_2m: unknown; use one of ddim, pndm"),
    ("line", "--from_file {root}/bad.txt line 2: unknown option --ss"),
    ("size", "--W 100: must be a multiple of 8"),
    ("no_prompt", "give either --prompt"),
    ("embedding", "--textual_inversion_embeddings {root}/missing.pt: no such file"),
    ("module", "--network_module networks.nothing: cannot import it"),
])
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys, case, message):
    root, model, a = trained["root"], trained["model"], trained["a"]
    (root / "bad.txt").write_text("a dog\na cat --ss 3\n", encoding="utf-8")
    base = ["--outdir", tmp_path / "out", "--ckpt", model, "--prompt", "a dog"]
    lora = ["--network_module", "networks.lora", "--network_weights", a]
    argv = {
        "no_model": ["--outdir", tmp_path / "out", "--ckpt", root / "missing.safetensors", "--prompt", "x"],
        "no_lora": [*base, "--network_module", "networks.lora", "--network_weights", root / "missing.safetensors"],
        "counts": [*base, "--network_module", "networks.lora", "--network_weights", a, a],
        "muls": [*base, *lora, "--network_mul", "1", "0.5"],
        "sampler": [*base, "--sampler", "k_dpmpp_2m"],
        "line": ["--outdir", tmp_path / "out", "--ckpt", model, "--from_file", root / "bad.txt"],
        "size": [*base, "--W", "100"],
        "no_prompt": ["--outdir", tmp_path / "out", "--ckpt", model],
        "embedding": [*base, "--textual_inversion_embeddings", root / "missing.pt"],
        "module": [*base, "--network_module", "networks.nothing", "--network_weights", a],
    }[case]
    capsys.readouterr()
    assert run_script(gen, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + message.format(root=root)), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_lora_that_does_not_fit_the_model(trained, tmp_path, capsys):
    """A LoRA whose layers are not in the model, or whose shapes differ (trained on another architecture),
    is refused after loading, with one line."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(trained["a"]))
    foreign = tmp_path / "foreign.safetensors"
    save_file({k.replace("lora_unet_", "lora_unet_nothing_"): v for k, v in weights.items()
               if k.startswith("lora_unet_")}, str(foreign))
    key = next(k for k in weights if k.endswith("lora_down.weight") and weights[k].dim() == 2)
    wider = tmp_path / "wider.safetensors"
    save_file({**weights, key: torch.zeros(weights[key].shape[0], weights[key].shape[1] + 8)}, str(wider))
    for path, message in ((foreign, "none of its modules matches a layer of this model (an SD1 network on an SD2 "
                                    "model, or not a networks.lora file?)"),
                          (wider, "does not fit this model (")):
        capsys.readouterr()
        assert run_script(gen, ["--outdir", tmp_path / "out", "--ckpt", trained["model"], "--prompt", "a dog",
                                "--network_module", "networks.lora", "--network_weights", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --network_weights {path}: {message}"), err
        assert "size mismatch" in err[0] or path == foreign


def test_command_line(trained, tmp_path):
    """As a real process: --help says what --xformers/--sdpa do on the CPU; a bad input exits 2."""
    script = str(REPO / "gen_img_diffusers.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0 and "no effect on the CPU" in shown.stdout and "--network_mul" in shown.stdout
    bad = subprocess.run([sys.executable, script, "--ckpt", str(trained["model"]), "--outdir", str(tmp_path / "o"),
                          "--prompt", "x", "--sampler", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: --sampler nope: unknown; use one of {', '.join(SAMPLER_NAMES)}"]


def test_embedding_that_does_not_fit(trained, tmp_path, capsys):
    """Vectors of another width, or a file name that is already a word, are refused with one line."""
    from safetensors.torch import save_file

    wide, word = tmp_path / "zqwide.safetensors", tmp_path / "dog.safetensors"
    save_file({"emb_params": torch.zeros(1, 48)}, str(wide))
    save_file({"emb_params": torch.zeros(1, 32)}, str(word))
    for path, message in ((wide, "vectors of size 48, but this model's text encoder uses 32"),
                          (word, "cannot add the token 'dog' (the file name; rename the file")):
        capsys.readouterr()
        assert run_script(gen, ["--outdir", tmp_path / "out", "--ckpt", trained["model"], "--prompt", "a dog",
                                "--textual_inversion_embeddings", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --textual_inversion_embeddings {path}: {message}"), err


# ---- the option group, prompt encoding once ------------------------------------------------------

def test_every_option_has_one_field_with_the_parser_default():
    """GenerationOptions has exactly the options of the parser, with the same defaults (lists: tuples)."""
    import dataclasses

    from gen_img_diffusers import build_parser
    from library.generation_options import GenerationOptions

    args = build_parser().parse_args([])
    fields = {f.name: f.default for f in dataclasses.fields(GenerationOptions)}
    assert set(fields) == set(vars(args))
    assert all(fields[name] == value for name, value in vars(args).items())
    opts = GenerationOptions.from_args(build_parser().parse_args(["--network_mul", "0.5", "1", "--bf16"]))
    assert opts.network_mul == (0.5, 1.0) and opts.weight_dtype == torch.bfloat16 and opts.max_token_length == 225
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.steps = 3  # type: ignore[misc]


def test_each_prompt_is_encoded_once_for_all_its_images(trained, tmp_path, monkeypatch):
    """3 images in batches of 1 for each of 3 lines, two of them the same prompt: 2 encodings (not 9), and
    the images are those of each seed made on its own."""
    from library.training import sampling

    calls = []
    real = sampling.encode_prompt_pair

    def counting(components, prompt, negative_prompt):
        calls.append((prompt, negative_prompt))
        return real(components, prompt, negative_prompt)

    monkeypatch.setattr(sampling, "encode_prompt_pair", counting)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --n dog --d 10\na cat --n dog --d 20\nsks dog --d 30\n", encoding="utf-8")
    common = ["--ckpt", trained["model"], "--W", "64", "--H", "64", "--steps", "2"]
    images = generate(tmp_path / "out", *common, "--from_file", prompts, "--images_per_prompt", "3")
    assert sorted(calls) == [("a cat", "dog"), ("sks dog", "")]
    assert [p.name for p in images] == [f"{i:06d}_{s}.png" for i, s in enumerate([10, 11, 12, 20, 21, 22, 30, 31, 32])]
    (alone,) = generate(tmp_path / "alone", *common, "--prompt", "a cat --n dog --d 21")
    assert np.array_equal(pixels(alone), pixels(images[4]))
