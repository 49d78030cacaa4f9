"""The global batch (docs/distributed.md): with one bucket, the N per-process batches of a step are exactly
the one-process batch of N times the size (same samples, augmentations, captions and noise seeds), every
random draw of a step is per sample, and a short last step weighs as in the one-process run."""

from __future__ import annotations

import pytest
import torch

from library.config import load_dataset_blueprint
from library.data.dataset import build_dataset_group
from library.dataset_debug import build_parser
from library.option_groups import Options
from library.training import diffusion
from library.training.epoch_loader import RunBatches
from library.training.trainer import _share_of_global_batch
from tests.train_util import make_dataset


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def _group(data, batch: int, *extra: str):
    argv = ["--train_data_dir", str(data), "--resolution", "64", "--train_batch_size", str(batch), "--flip_aug",
            "--shuffle_caption", "--caption_tag_dropout_rate", "0.3", "--caption_extension", ".caption", *extra]
    args, unknown = build_parser("t.py", support_dreambooth=True, support_caption=True,
                                 support_caption_dropout=True).parse_known_args(argv)
    assert not unknown
    opts = Options.from_args(args)
    return build_dataset_group(load_dataset_blueprint(opts.data, opts.validation, None, given=opts.given), seed=5)


@pytest.fixture()
def data(tmp_path):
    # 7 images x 2 repeats = 14 samples: batches of 2 -> 7, of 4 -> 4 (the last one short)
    return make_dataset(tmp_path / "data", folder="2_sks dog", count=7,
                        captions={i: "red, green, blue, cyan, pink" for i in range(7)})


@pytest.mark.parametrize("world", [2, 3])
def test_the_processes_batches_of_a_step_make_the_one_process_batch(data, world):
    single = RunBatches(_group(data, 2 * world), 0, 1)
    ranks = [RunBatches(_group(data, 2), r, world) for r in range(world)]
    for epoch in (1, 2):
        assert len(single.share(epoch)) == len(ranks[0].share(epoch))  # the same number of steps
        for index in range(len(single.share(epoch))):
            whole = single[(epoch, index, 0)]
            parts = [r[(epoch, index, 0)] for r in ranks]
            real = [p for p in parts if not p["padding"]]
            assert whole["keys"] == [k for p in real for k in p["keys"]], (epoch, index)
            for name in ("captions", "flipped", "noise_seeds"):
                assert whole[name] == [v for p in real for v in p[name]], (name, epoch, index)
            assert torch.equal(whole["images"], torch.cat([p["images"] for p in real]))
            assert all(p["global_samples"] == len(whole["keys"]) for p in parts)
    flips = [f for i in range(len(single.share(1))) for f in single[(1, i, 0)]["flipped"]]
    assert any(flips) and not all(flips)  # the augmentations do draw
    seeds = [s for e in (1, 2) for i in range(len(single.share(e))) for s in single[(e, i, 0)]["noise_seeds"]]
    assert len(set(seeds)) == len(seeds)  # every sample of every epoch has its own noise (repeats too)


def test_several_buckets_keep_per_process_batches_of_one_bucket(tmp_path):
    """With several buckets a step's global batch is several per-process batches, each of one bucket."""
    make_dataset(tmp_path / "data", folder="2_a", count=3)
    make_dataset(tmp_path / "data", folder="2_b", count=3, size=(64, 128))
    ranks = [RunBatches(_group(tmp_path / "data", 2, "--enable_bucket", "--min_bucket_reso", "32",
                                "--max_bucket_reso", "128", "--bucket_reso_steps", "32"), r, 2) for r in range(2)]
    steps = [[r[(epoch, i, 0)] for r in ranks] for epoch in (1, 2, 3) for i in range(len(ranks[0].share(epoch)))]
    assert any(a["bucket_reso"] != b["bucket_reso"] for a, b in steps)  # a step of two buckets
    for epoch in (1, 2, 3):  # every sample once per epoch, each batch of one bucket
        batches = [r[(epoch, i, 0)] for r in ranks for i in range(len(r.share(epoch)))]
        keys = sorted(k for b in batches if not b["padding"] for k in b["keys"])
        assert len(keys) == 12 and len(set(keys)) == 6
        assert all(tuple(b["images"].shape[-2:][::-1]) == tuple(b["bucket_reso"]) for b in batches)


NOISE = {"noise_offset": 0.1, "adaptive_noise_scale": 0.05, "noise_offset_random_strength": True,
         "multires_iterations": 3, "multires_discount": 0.3}


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_a_samples_draws_do_not_depend_on_its_batch():
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seeds = [11, 12, 13, 14]
    whole = diffusion.sample_noise(latents, _gens(seeds), **NOISE)
    halves = torch.cat([diffusion.sample_noise(latents[:2], _gens(seeds[:2]), **NOISE),
                        diffusion.sample_noise(latents[2:], _gens(seeds[2:]), **NOISE)])
    assert torch.equal(whole, halves)
    alone = diffusion.sample_noise(latents[1:2], torch.Generator().manual_seed(12), **NOISE)
    assert torch.equal(whole[1:2], alone)  # a sample with its own generator is a batch of one
    for j in range(4):  # the pyramid noise is normalised per sample
        assert abs(float(whole[j].std()) - 1.0) < 1e-5
    t = diffusion.sample_timesteps(4, _gens(seeds), 100, 900)
    assert torch.equal(t, torch.cat([diffusion.sample_timesteps(2, _gens(seeds[:2]), 100, 900),
                                     diffusion.sample_timesteps(2, _gens(seeds[2:]), 100, 900)]))
    p = diffusion.perturb_noise(whole, _gens(seeds), 0.1, random_strength=True)
    assert torch.equal(p[2:], diffusion.perturb_noise(whole[2:], _gens(seeds[2:]), 0.1, random_strength=True))
    assert torch.equal(diffusion.normal((4, 3), _gens(seeds))[3], torch.randn(3, generator=_gens([14])[0]))
    with pytest.raises(ValueError, match="3 generators for a batch of 4"):
        diffusion.sample_noise(latents, _gens(seeds[:3]))


def test_a_short_last_step_weighs_as_in_one_process():
    """Mean per process × world × count / global count, averaged over processes = the global mean."""
    losses = [torch.tensor([1.0, 2.0]), torch.tensor([4.0])]  # rank 0: two samples, rank 1: one
    batches = [{"keys": ["a", "b"], "global_samples": 3}, {"keys": ["c"], "global_samples": 3}]
    averaged = sum(l.mean() * _share_of_global_batch(b, 2) for l, b in zip(losses, batches)) / 2
    assert torch.isclose(averaged, torch.tensor(7.0 / 3))
    assert _share_of_global_batch({"keys": ["a", "b"], "global_samples": 4}, 2) == 1.0  # full batches: exactly 1
    assert _share_of_global_batch({"keys": ["a"], "global_samples": 1, "padding": True}, 2) == 0.0
    assert _share_of_global_batch({"keys": ["a"]}, 1) == 1.0


def test_a_state_with_per_process_noise_generators_still_resumes(tmp_path, caplog):
    """States no longer hold a noise generator; one written when they did (``noise_per_rank``) still resumes."""
    import logging

    from tests.models_util import make_model_files
    from tests.train_util import run_script
    from train_network import main as train

    model = make_model_files(tmp_path / "models", "tiny-sd1", formats="safetensors")["safetensors"]
    data = make_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"

    def argv(steps, *extra):
        return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
                "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "2", "--max_train_steps",
                str(steps), "--seed", "1", "--max_data_loader_n_workers", "0", "--save_state", *extra]

    assert run_script(train, argv(2)) == 0
    state_file = out / "last-state" / "state.pt"
    payload = torch.load(state_file, weights_only=False)
    assert "noise" not in payload["rng"] and "noise_per_rank" not in payload["extra"]
    old = torch.Generator().manual_seed(1000).get_state()  # what the old trainer saved
    payload["rng"]["noise"], payload["extra"]["noise_per_rank"] = old, [old]
    torch.save(payload, state_file)
    with caplog.at_level(logging.INFO):
        assert run_script(train, argv(3, "--resume", out / "last-state")) == 0
    assert "was written when each process had its own noise generator" in caplog.text
    assert torch.load(out / "last-state" / "state.pt", weights_only=False)["progress"]["global_step"] == 3
