"""The whole preprocessing chain as a user runs it, on a generated folder: images -> BLIP captions (tiny random
model) -> WD14 tags (tiny ONNX tagger) -> merged metadata -> cleaned -> bucketed latents -> fine_tune.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune import make_captions, tag_images_by_wd14_tagger as tagger
from finetune.clean_captions_and_tags import main as clean_main
from finetune.merge_captions_to_metadata import main as merge_captions
from finetune.merge_dd_tags_to_metadata import main as merge_tags
from finetune.prepare_buckets_latents import main as prepare_main
from tests import test_captioning as captioning
from tests.train_util import run_script

# the tiny BLIP captioner, the tiny ONNX tagger and the no-Hub guard of the captioning tests
blip_dir, tagger_dir, _offline = captioning.blip_dir, captioning.tagger_dir, captioning._offline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.models_util import make_model_files

    return make_model_files(tmp_path_factory.mktemp("models"), "tiny-sd1", formats="safetensors")


def test_images_to_trained_model(tmp_path, blip_dir, tagger_dir, tiny, monkeypatch):
    import json

    from fine_tune import main as fine_tune
    from library.models.statedict import open_state_dict

    monkeypatch.chdir(tmp_path)
    data = Path("train_data")
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(96, 64), (64, 96), (64, 64), (80, 48)]):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        pixels[..., i % 3] = 255  # a dominant channel, so the tagger's tags differ between images
        Image.fromarray(pixels).save(data / f"img{i}.png")
    (data / "broken.png").write_bytes(b"not an image")

    assert run_script(make_captions.main, [data, "--caption_weights", blip_dir, "--seed", "1",
                                           "--max_length", "12"]) == 0
    assert run_script(tagger.main, [data, "--model_dir", tagger_dir, "--thresh", "0.3"]) == 0
    assert sorted(p.name for p in data.glob("*.caption")) == [f"img{i}.caption" for i in range(4)]
    assert sorted(p.name for p in data.glob("*.txt")) == [f"img{i}.txt" for i in range(4)]

    assert run_script(merge_captions, [data, "meta_cap.json"]) == 0
    assert run_script(merge_tags, [data, "meta_cap.json", "--in_json", "meta_cap.json"]) == 0
    assert run_script(clean_main, ["meta_cap.json", "meta_clean.json"]) == 0
    assert run_script(prepare_main, [data, "meta_clean.json", "meta_lat.json", tiny["safetensors"],
                                     "--max_resolution", "64,64", "--min_bucket_reso", "32",
                                     "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
                                     "--max_data_loader_n_workers", "0"]) == 0
    meta = json.loads(Path("meta_lat.json").read_text(encoding="utf-8"))
    assert sorted(meta) == [f"img{i}" for i in range(4)]  # the broken image was reported and skipped
    for i in range(4):
        entry = meta[f"img{i}"]
        assert entry["caption"] and entry["tags"] and "train_resolution" in entry
        assert (data / f"img{i}.npz").is_file()

    argv = ["--pretrained_model_name_or_path", tiny["safetensors"], "--in_json", "meta_lat.json",
            "--train_data_dir", data, "--output_dir", "out", "--max_train_steps", "2", "--learning_rate", "1e-3",
            "--seed", "1", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors"]
    assert run_script(fine_tune, argv) == 0
    trained, base = open_state_dict(Path("out/last.safetensors")), open_state_dict(tiny["safetensors"])
    import torch

    keys = [k for k in base.keys() if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(trained[k], base[k]) for k in keys)

    # re-running every step is idempotent: same metadata, same latents
    before = Path("meta_lat.json").read_bytes()
    assert run_script(make_captions.main, [data, "--caption_weights", blip_dir, "--seed", "1", "--max_length", "12"]) == 0
    assert run_script(tagger.main, [data, "--model_dir", tagger_dir, "--thresh", "0.3"]) == 0
    assert run_script(merge_captions, [data, "meta_cap.json"]) == 0
    assert run_script(merge_tags, [data, "meta_cap.json", "--in_json", "meta_cap.json"]) == 0
    assert run_script(clean_main, ["meta_cap.json", "meta_clean.json"]) == 0
    assert run_script(prepare_main, [data, "meta_clean.json", "meta_lat.json", tiny["safetensors"],
                                     "--max_resolution", "64,64", "--min_bucket_reso", "32",
                                     "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
                                     "--max_data_loader_n_workers", "0"]) == 0
    assert Path("meta_lat.json").read_bytes() == before
