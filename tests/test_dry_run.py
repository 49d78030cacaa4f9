"""--dry_run: the report on a known dataset against hand-computed numbers, for every training script, without
loading a weight (docs/dry_run.md)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.train_util import run_script
from train_network import main as train_network

LR = 1e-3


def _images(folder, count, size, seed):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD1 checkpoint and a TOML dataset: 3 square images x 3 repeats and 1 wide image (bucket
    192x64, alone: a partial batch) to train, 4 square regularization images; batch size 2."""
    from tests.models_util import make_model_files

    root = tmp_path_factory.mktemp("dry")
    model = make_model_files(root / "models", "tiny-sd1", formats="safetensors")["safetensors"]
    _images(root / "sq", 3, (64, 64), 1)
    _images(root / "wide", 1, (200, 64), 10)
    _images(root / "reg", 4, (64, 64), 20)
    (root / "sq" / "img0.caption").write_text("zkz dog, sitting, grass, sun", encoding="utf-8")
    config = root / "data.toml"
    config.write_text(f"""[general]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 64
[[datasets]]
resolution = 128
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{root / "sq"}'
  num_repeats = 3
  class_tokens = 'zkz dog'
  [[datasets.subsets]]
  image_dir = '{root / "wide"}'
  class_tokens = 'zkz dog'
  [[datasets.subsets]]
  image_dir = '{root / "reg"}'
  is_reg = true
  class_tokens = 'dog'
""", encoding="utf-8")
    prompts = root / "prompts.txt"
    prompts.write_text("a zkz dog\na cat --d 5\n", encoding="utf-8")
    return {"root": root, "model": model, "config": config, "prompts": prompts}


def lora_args(setup, out, *extra):
    return ["--pretrained_model_name_or_path", setup["model"], "--dataset_config", setup["config"],
            "--output_dir", out, "--output_name", "lora", "--network_module", "networks.lora", "--network_dim", "4",
            "--gradient_accumulation_steps", "2", "--max_train_epochs", "3", "--learning_rate", str(LR),
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--save_every_n_epochs", "1",
            "--save_last_n_epochs", "1", "--save_state", "--sample_every_n_epochs", "2", "--sample_at_first",
            "--sample_prompts", setup["prompts"], "--seed", "7", "--max_data_loader_n_workers", "0", *extra]


def dry(main, argv, tmp_path, name="report.json"):
    path = tmp_path / name
    assert run_script(main, [*argv, "--dry_run_json", path]) == 0
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load the model or read a tensor from a weights file fails the test."""
    from library.models import load, statedict

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run read weights")

    monkeypatch.setattr(load, "load_model", refuse)
    monkeypatch.setattr(statedict.LazyStateDict, "__getitem__", refuse)


def test_lora_report_against_hand_computed_numbers(setup, tmp_path, no_weights, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"an earlier run")
    report = dry(train_network, lora_args(setup, out), tmp_path)
    text = capsys.readouterr().out
    assert not (out / "lora-000001.safetensors").exists() and not (out / "sample").exists()  # nothing written

    # buckets: 3 square train images x 3 repeats + 4 reg images in 128x128; the wide image alone in 192x64
    ds = report["datasets"][0]
    buckets = {tuple(b["resolution"]): b for b in ds["buckets"]}
    assert set(buckets) == {(128, 128), (192, 64)}
    square, wide = buckets[(128, 128)], buckets[(192, 64)]
    # reg images balance the 10 training samples: 4 taken once, then passes add one each in name order
    assert (square["images"], square["train_images"], square["reg_images"]) == (7, 3, 4)
    assert square["samples"] == 9 + 10 and square["batch_sizes"] == [2] * 9 + [1]
    assert (wide["images"], wide["samples"], wide["batch_sizes"]) == (1, 1, [1])
    assert ds["samples_per_epoch"] == 20 and ds["batches_per_epoch"] == 11
    assert ds["mean_batch_size"] == pytest.approx(20 / 11)
    assert len(ds["warnings"]) == 1 and "192x64" in ds["warnings"][0] and "batch 1" in ds["warnings"][0]
    assert "WARNING: bucket 192x64 has 1 sample(s)" in text
    assert report["text_encoder_outputs"] == "encoded at every step"  # the LoRA trains text-encoder modules
    assert "text-encoder outputs: encoded at every step" in text

    reg = report["regularization"][0]
    assert (reg["train_images"], reg["train_samples"], reg["reg_found"], reg["reg_used"]) == (4, 10, 4, 4)
    assert reg["repeats_used"] == {"3": 2, "2": 2} and reg["reg_samples"] == 10 and reg["ratio"] == 1.0

    # 11 batches, accumulation 2 -> 6 steps per epoch; 3 epochs -> 18 steps
    steps = report["steps"]
    assert (steps["batches_per_epoch"], steps["steps_per_epoch"], steps["epochs"], steps["max_train_steps"]) == \
        (11, 6, 3, 18)
    assert steps["total_batch_size"] == 4 and steps["gradient_accumulation_steps"] == 2  # batch 2 x accumulation 2
    assert steps["mean_samples_per_step"] == pytest.approx(20 / 11 * 2) and steps["last_epoch_steps"] == 6

    # cosine with 3 warm-up steps over 18 steps, at 0/10/25/50/75/100 %
    def cosine(k):
        if k < 3:
            return LR * k / 3
        return LR * 0.5 * (1 + math.cos(math.pi * (k - 3) / 15))

    points = report["learning_rate"]["points"]
    assert [p["step"] for p in points] == [0, 1, 4, 9, 13, 17]
    assert report["learning_rate"]["groups"] == ["text encoder", "unet"]
    for p in points:
        assert p["lrs"]["unet"] == pytest.approx(cosine(p["step"]), rel=1e-6, abs=1e-12)
        assert p["lrs"]["text encoder"] == p["lrs"]["unet"]

    # files: epochs 1 and 2 (--save_last_n_epochs 1 deletes epoch 1), the final save, states of each
    saves = [(s["name"], s["kept"], s["exists"]) for s in report["outputs"]["saves"]]
    assert saves == [("lora-000001.safetensors", False, False), ("lora-000001-state/", False, False),
                     ("lora-000002.safetensors", True, False), ("lora-000002-state/", True, False),
                     ("lora.safetensors", True, True), ("lora-state/", True, False)]
    samples = report["outputs"]["samples"]
    assert samples["points"] == ["start (step 0)", "epoch 2"] and samples["files"] == 4
    assert any("lora.safetensors exists and would be replaced" in w for w in report["warnings"])
    assert "REPLACES an existing file" in text

    # captions as trained: every training caption holds the class tokens or the caption file's tags
    captions = report["captions"]
    assert len(captions) == 6
    assert all(c["caption"] in ("zkz dog", "dog", "zkz dog, sitting, grass, sun") for c in captions)


def test_parameter_counts_match_the_real_modules(setup, tmp_path):
    from library.models.load import load_model
    from networks.lora import create_network

    report = dry(train_network, lora_args(setup, tmp_path / "out"), tmp_path)
    model = load_model(setup["model"])
    real = {name: sum(p.numel() for p in getattr(model, attr).parameters())
            for name, attr in (("unet", "unet"), ("text_encoder", "text_encoder"), ("vae", "vae"))}
    assert report["memory"]["parameters"] == real
    network = create_network(1.0, 4, 1, model.vae, model.text_encoder, model.unet)
    lora = sum(p.numel() for p in network.parameters())
    assert report["trainable"]["parameters"] == lora
    lines = {line["label"]: line for line in report["memory"]["lines"]}
    # no mixed precision: fp32 everywhere; AdamW keeps two fp32 moments per trained weight
    assert lines["UNet weights"]["bytes"] == real["unet"] * 4
    assert lines["text encoder weights"]["bytes"] == real["text_encoder"] * 4
    assert lines["network weights"]["bytes"] == lines["gradients"]["bytes"] == lora * 4
    assert lines["optimizer state (AdamW)"]["bytes"] == lora * 8
    assert report["memory"]["static_bytes"] == sum(line["bytes"] for line in report["memory"]["lines"])


def test_memory_options_change_the_estimate(setup, tmp_path):
    base = dry(train_network, lora_args(setup, tmp_path / "a"), tmp_path, "a.json")["memory"]
    changed = dry(train_network, lora_args(setup, tmp_path / "b", "--mixed_precision", "bf16", "--optimizer_type",
                                           "Lion", "--gradient_checkpointing", "--network_train_unet_only"),
                  tmp_path, "b.json")["memory"]
    lines = {line["label"]: line for line in changed["lines"]}
    assert lines["UNet weights"]["dtype"] == "bf16" and lines["text encoder weights"]["dtype"] == "fp32"
    trained = lines["gradients"]["count"]
    assert lines["optimizer state (Lion)"]["bytes"] == trained * 4  # one fp32 state
    assert changed["gradient_checkpointing"] and not base["gradient_checkpointing"]
    for row in base["activations"] + changed["activations"]:
        assert 0 < row["with_checkpointing"] < row["without_checkpointing"]
    # the largest bucket per batch comes first: 128x128 at batch 2
    assert base["activations"][0]["resolution"] == [128, 128] and base["activations"][0]["batch"] == 2
    assert changed["peak_bytes"] < base["peak_bytes"]


def test_activation_count_matches_a_real_forward_pass():
    """The meta-device count of the tensors saved for backward agrees with a real CPU forward pass."""
    from diffusers import UNet2DConditionModel

    from library.models.presets import get_preset
    from library.dry_run import memory as mem

    config = get_preset("tiny-sd1").unet
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(torch.randn(2, 4, 16, 24), torch.tensor([10, 10]), torch.randn(2, 77, 32))
    with torch.device("meta"):
        meta_unet = UNet2DConditionModel.from_config(config)
    meta_unet.requires_grad_(True)
    saved = mem.count_unet_activations(mem.MetaModel(meta_unet, None, None, None, ""), latent_size=(24, 16), batch=2,
                                       context_len=77, dtype=torch.float32, cond_requires_grad=False,
                                       sliced_attention=False)
    assert saved.without_checkpointing() == pytest.approx(sum(seen.values()), rel=0.15)
    assert saved.with_checkpointing() < saved.without_checkpointing() / 2


def test_captions_are_the_ones_training_draws(setup, tmp_path, monkeypatch):
    """The report's captions equal those of the real run's first batches (same seed)."""
    from library.data import dataset

    argv = lora_args(setup, tmp_path / "out", "--shuffle_caption", "--caption_tag_dropout_rate", "0.3",
                     "--max_train_steps", "3", "--max_train_epochs", "0")
    argv = [a for a in argv if a not in ("--sample_at_first",)]
    i = argv.index("--sample_every_n_epochs")
    del argv[i:i + 2]
    report = dry(train_network, argv, tmp_path)
    drawn = []
    original = dataset.DatasetGroup.load_batch

    def recording(self, spec, epoch, position, step=0):
        batch = original(self, spec, epoch, position, step)
        if batch is not None and epoch == 1:
            drawn.extend(batch["captions"])
        return batch

    monkeypatch.setattr(dataset.DatasetGroup, "load_batch", recording)
    assert run_script(train_network, argv) == 0
    assert [c["caption"] for c in report["captions"]] == drawn[:len(report["captions"])]


def test_every_script_accepts_dry_run(setup, tmp_path, no_weights, capsys):
    import fine_tune
    import train_db
    import train_textual_inversion
    import train_textual_inversion_XTI

    common = ["--pretrained_model_name_or_path", setup["model"], "--max_train_steps", "4", "--seed", "1"]
    db = dry(train_db.main, [*common, "--dataset_config", setup["config"], "--output_dir", tmp_path / "db",
                             "--save_model_as", "safetensors"], tmp_path, "db.json")
    assert db["trainable"]["parameters"] == db["memory"]["parameters"]["unet"] + \
        db["memory"]["parameters"]["text_encoder"]
    assert db["outputs"]["saves"][-1]["name"] == "last.safetensors"

    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({str(p): {"caption": "a dog", "tags": "grass"} for p in
                                sorted((setup["root"] / "sq").glob("*.png"))}), encoding="utf-8")
    ft = dry(fine_tune.main, [*common, "--in_json", meta, "--train_data_dir", setup["root"] / "sq", "--resolution",
                              "64", "--output_dir", tmp_path / "ft"], tmp_path, "ft.json")
    assert ft["trainable"]["parameters"] == ft["memory"]["parameters"]["unet"]  # UNet only by default
    assert ft["outputs"]["saves"][-1]["name"] == "last.ckpt" and ft["captions"][0]["caption"] == "a dog, grass"

    ti_args = [*common, "--dataset_config", setup["config"], "--token_string", "zkz", "--init_word", "dog",
               "--num_vectors_per_token", "2", "--save_model_as", "safetensors"]
    ti = dry(train_textual_inversion.main, [*ti_args, "--output_dir", tmp_path / "ti"], tmp_path, "ti.json")
    vocab, width = 49408, 32
    assert ti["trainable"]["parameters"] == (vocab + 2) * width
    assert ti["outputs"]["saves"][-1]["name"] == "zkz.safetensors"
    assert all("zkz zkz1" in c["caption"] for c in ti["captions"] if c["caption"].startswith("zkz"))
    xti = dry(train_textual_inversion_XTI.main, [*ti_args, "--output_dir", tmp_path / "xti"], tmp_path, "xti.json")
    assert xti["trainable"]["parameters"] == (vocab + 2 + 2 * 4) * width  # tiny UNet: 4 cross-attention layers
    out = capsys.readouterr().out
    assert out.count("=== dry run:") == 4 and "ESTIMATED PEAK" in out
    assert not any((tmp_path / d).exists() for d in ("db", "ft", "ti", "xti"))


def test_a_model_folder_without_weights_is_enough(setup, tmp_path, capsys):
    """Only configs: the real SD1.5 architecture is counted without a weight file in sight."""
    from library.models.presets import get_preset

    folder = tmp_path / "sd15"
    configs = get_preset("sd1")
    for name, config in (("unet", configs.unet), ("vae", configs.vae), ("text_encoder", configs.text_encoder)):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "model_index.json").write_text("{}", encoding="utf-8")
    argv = lora_args(setup, tmp_path / "out", "--mixed_precision", "bf16")
    argv[1] = folder
    report = dry(train_network, argv, tmp_path)
    assert report["memory"]["parameters"] == {"unet": 859520964, "text_encoder": 123060480, "vae": 83653863}
    modules = [p for p in report["trainable"]["parts"]]
    assert modules == ["network: text encoder (72 modules)", "network: UNet (192 modules)"]
    # dim 4 on every targeted Linear / 1x1 conv: 4 x (in + out) each, summed over the real SD1.5 layers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from networks.lora_common import (LORA_PREFIX_TEXT_ENCODER, LORA_PREFIX_UNET, TEXT_ENCODER_TARGET_MODULES,
                                      UNET_TARGET_MODULES, find_target_modules)

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(get_preset("sd1").unet)
        te = CLIPTextModel(CLIPTextConfig(**get_preset("sd1").text_encoder))
    layers = list(find_target_modules(unet, LORA_PREFIX_UNET, UNET_TARGET_MODULES)) + \
        list(find_target_modules(te, LORA_PREFIX_TEXT_ENCODER, TEXT_ENCODER_TARGET_MODULES))
    expected = sum(4 * (m.weight.shape[1] + m.weight.shape[0]) for _, m in layers)
    assert len(layers) == 264 and report["trainable"]["parameters"] == expected


def test_errors_are_one_line(setup, tmp_path, capsys):
    from safetensors.torch import save_file

    lora_file = tmp_path / "not_a_model.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora_file))
    argv = lora_args(setup, tmp_path / "out", "--dry_run")
    argv[1] = lora_file
    assert run_script(train_network, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a Stable Diffusion 1.x/2.x checkpoint (found: lora)" in err[0]

    module = tmp_path / "meta_hostile_net.py"
    module.write_text("def create_network(multiplier, dim, alpha, vae, te, unet, **kw):\n"
                      "    return float(unet.conv_in.weight.sum())\n", encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        argv = lora_args(setup, tmp_path / "out", "--dry_run")
        argv[argv.index("networks.lora")] = "meta_hostile_net"
        assert run_script(train_network, argv) == 2
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dry_run: cannot build meta_hostile_net on the meta device" in err[0]

    before = setup["config"].read_bytes()
    assert run_script(train_network, lora_args(setup, tmp_path / "out", "--dry_run_json", setup["config"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the --dataset_config file" in err[0] and setup["config"].read_bytes() == before


def test_step_saves_retention_and_resume(setup, tmp_path):
    """Step saves every 4 of 18 steps, keeping the last 4 steps' worth; resumed at step 9 of an earlier run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora-step00000004.safetensors").write_bytes(b"from the first part of the run")
    state = out / "lora-step00000009-state"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"global_step": 9, "epoch": 2, "seed": 7}), encoding="utf-8")
    argv = [a for a in lora_args(setup, out, "--save_every_n_steps", "4", "--save_last_n_steps", "4", "--resume", state)
            if a not in ("--save_state", "--sample_at_first")]
    i = argv.index("--save_every_n_epochs")
    del argv[i:i + 2]
    report = dry(train_network, argv, tmp_path)
    saves = [(s["name"], s["point"], s["kept"]) for s in report["outputs"]["saves"]]
    # steps 12 and 16 are saved after the resume; saving 12 deletes step 4 (r = 12-4-1 = 7 -> 4), 16 deletes 8
    assert saves == [("lora-step00000012.safetensors", "step 12", True),
                     ("lora-step00000016.safetensors", "step 16", True), ("lora.safetensors", "end", True)]
    assert report["outputs"]["deleted_existing"] == ["lora-step00000004.safetensors"]
    assert report["outputs"]["samples"]["points"] == ["epoch 2"]
    assert any("lora-step00000004.safetensors exists and would be deleted" in w for w in report["warnings"])


def test_text_encoder_outputs_mode(setup, tmp_path, no_weights):
    """The report says how the steps get their text conditioning (automatic reuse, cache, or every step)."""
    unet_only = [*lora_args(setup, tmp_path / "out"), "--network_train_unet_only"]
    assert dry(train_network, unet_only, tmp_path)["text_encoder_outputs"].startswith("reused per caption")
    cached = dry(train_network, [*unet_only, "--cache_text_encoder_outputs"], tmp_path)
    assert cached["text_encoder_outputs"] == "cached before training, in memory"
    assert dry(train_network, [*unet_only, "--shuffle_caption"], tmp_path)["text_encoder_outputs"] == \
        "encoded at every step"


def test_the_dry_run_knows_no_method_by_name():
    """library/dry_run gets everything method-specific through DryRunPlan: none of its modules imports a method
    module (lazy imports counted), and library/training imports neither the dry run nor a method but the base."""
    grimp = pytest.importorskip("grimp")

    graph = grimp.build_graph("library", include_external_packages=False, cache_dir=None)
    edges = [(m, imp) for m in graph.modules for imp in graph.find_modules_directly_imported_by(m)]
    assert not [(m, imp) for m, imp in edges
                if m.startswith("library.dry_run") and imp.startswith("library.methods")]
    assert not [(m, imp) for m, imp in edges if m.startswith("library.training")
                and (imp.startswith("library.dry_run")
                     or (imp.startswith("library.methods.") and imp != "library.methods.base"))]
    # the methods use only the interface module of the dry run
    assert {imp for m, imp in edges if m.startswith("library.methods") and imp.startswith("library.dry_run")} == \
        {"library.dry_run.plan"}
