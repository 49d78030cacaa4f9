"""EMA of the trained weights (library/training/ema.py) end to end on tiny models: the saved EMA equals the
analytic EMA of the per-step weights, saving it leaves training untouched, resume is exact, every method
gets it, and every mistake is a one-line error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.training.ema import ExponentialMovingAverage, warmed_decay
from tests.train_util import make_dataset, run_script
from train_network import main as train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, folder="3_sks dog", count=4, captions={0: "sks dog, sitting", 1: "sks dog, running"})


def base_args(models, data, out, *extra, steps=5):
    return ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-2", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def state(folder):
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=False)


def step_file(out, step, last, ext="safetensors"):
    return out / ("last." + ext if step == last else f"at-step{step:08d}.{ext}")


@pytest.mark.parametrize("every", [1, 2])
def test_saved_ema_is_the_analytic_ema_of_the_per_step_weights(models, data, tmp_path, every):
    """Run A saves the raw LoRA at every step; run B (--save_ema) saves the EMA at every step. B's files equal
    s_0 = start, s_n = d_n s_{n-1} + (1 - d_n) w_k at every ``every``-th step k, d_n = min(0.9, (1+n)/(10+n)),
    computed in float64 from A's files; B's raw weights (in its state) equal A's: saving the EMA changed nothing."""
    assert run_script(train, base_args(models, data, tmp_path / "init", steps=1)) == 0
    start = tmp_path / "init" / "last.safetensors"
    common = ["--network_weights", start, "--save_every_n_steps", "1", "--ema_decay", "0.9",
              "--ema_update_every", str(every)]
    assert run_script(train, base_args(models, data, tmp_path / "a", *common, "--ema")) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *common, "--save_ema", "--save_state")) == 0
    w0 = load_file(str(start))
    trained = [k for k in w0 if not k.endswith(".alpha")]
    ema = {k: w0[k].double() for k in trained}
    updates = 0
    for step in range(1, 6):
        raw = load_file(str(step_file(tmp_path / "a", step, 5)))
        if step % every == 0:
            updates += 1
            d = min(0.9, (1 + updates) / (10 + updates))
            ema = {k: d * ema[k] + (1 - d) * raw[k].double() for k in trained}
        saved = load_file(str(step_file(tmp_path / "b", step, 5)))
        assert saved.keys() == w0.keys()
        for k in trained:
            torch.testing.assert_close(saved[k].double(), ema[k], atol=2e-7, rtol=1e-6)
        assert all(torch.equal(saved[k], w0[k]) for k in w0 if k.endswith(".alpha"))
    raw_last = load_file(str(tmp_path / "a" / "last.safetensors"))
    assert any(not torch.equal(raw_last[k], saved[k]) for k in trained)  # the EMA is not the raw weights
    b_state = state(tmp_path / "b" / "last-state")
    assert all(torch.equal(b_state["trainable"][k], raw_last[k]) for k in raw_last)
    assert b_state["extra"]["ema"]["updates"] == 5 // every


def test_resume_continues_the_ema_exactly(models, data, tmp_path):
    """8 steps straight == 3 steps + --resume to 8, for the saved EMA file and the EMA in the state (with a
    validation set checked every 2 steps, and the EMA kept with --ema_device cpu)."""
    extra = ["--save_ema", "--ema_decay", "0.8", "--ema_device", "cpu", "--validation_split", "0.25",
             "--validate_every_n_steps", "2", "--train_batch_size", "2", "--network_dropout", "0.1", "--save_state"]
    assert run_script(train, base_args(models, data, tmp_path / "a", *extra, steps=8)) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--save_every_n_steps", "3",
                                       steps=8)) == 0
    (tmp_path / "b" / "last.safetensors").unlink()
    resume = tmp_path / "b" / "at-step00000003-state"
    assert state(resume)["extra"]["ema"]["updates"] == 3
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--resume", resume, steps=8)) == 0
    a, b = load_file(str(tmp_path / "a" / "last.safetensors")), load_file(str(tmp_path / "b" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = state(tmp_path / "a" / "last-state")["extra"], state(tmp_path / "b" / "last-state")["extra"]
    assert sa["ema"]["updates"] == sb["ema"]["updates"] == 8
    assert all(torch.equal(x, y) for x, y in zip(sa["ema"]["shadow"], sb["ema"]["shadow"]))
    assert sa["validation"] == sb["validation"] and sa["validation"]["step"] == 8


def _method_run(script, models, data, tmp_path, out, *extra):
    common = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--resolution", "64",
              "--output_dir", out, "--max_train_steps", "3", "--seed", "1", "--max_data_loader_n_workers", "0",
              "--ema_decay", "0.8", "--train_batch_size", "2", *extra]
    if script == "db":
        from train_db import main
        return run_script(main, [*common, "--train_data_dir", data, "--learning_rate", "1e-3",
                                 "--save_model_as", "diffusers_safetensors"])
    if script == "ft":
        import json

        from fine_tune import main
        meta = {f"img{i}": {"caption": f"a photo of sks dog {i}"} for i in range(4)}
        (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        return run_script(main, [*common, "--train_data_dir", data / "3_sks dog", "--in_json",
                                 tmp_path / "meta.json", "--learning_rate", "1e-3", "--train_text_encoder",
                                 "--save_model_as", "diffusers_safetensors"])
    if script == "ti":
        from train_textual_inversion import main
    else:
        from train_textual_inversion_XTI import main
    return run_script(main, [*common, "--train_data_dir", data, "--learning_rate", "5e-2", "--token_string", "zqx",
                             "--init_word", "dog", "--num_vectors_per_token", "2", "--save_model_as", "safetensors",
                             "--use_object_template"])


@pytest.mark.parametrize("script", ["db", "ft", "ti", "xti"])
def test_every_method_keeps_and_saves_the_ema(models, data, tmp_path, script):
    """DreamBooth, fine-tuning (with the text encoder), TI and XTI: the EMA in the per-step states follows
    s_k = lerp(s_{k-1}, w_k, 1 - d_k) over the method's trained tensors (for TI only the new rows), and with
    --save_ema the saved file holds it."""
    out = tmp_path / "a"
    assert _method_run(script, models, data, tmp_path, out, "--ema", "--save_state", "--save_every_n_steps", "1") == 0
    stem, last = ("zqx", "zqx") if script in ("ti", "xti") else ("at", "last")
    states = [state(out / f"{stem}-step00000001-state"), state(out / f"{stem}-step00000002-state"),
              state(out / f"{last}-state")]
    names = states[0]["extra"]["ema"]["names"]
    if script in ("ti", "xti"):
        assert names == ["emb_params"]
        assert states[0]["extra"]["ema"]["shadow"][0].shape == states[0]["trainable"]["emb_params"].shape
        assert states[0]["extra"]["ema"]["shadow"][0].shape[0] < 100  # the new rows, not the whole matrix
    else:
        assert any(n.startswith("unet.") for n in names) and any(n.startswith("text_encoder.") for n in names)
    for k in (1, 2):
        previous, now = states[k - 1]["extra"]["ema"], states[k]["extra"]["ema"]
        weight = 1 - warmed_decay(0.8, k + 1)
        for name, s_prev, s_now in zip(names, previous["shadow"], now["shadow"]):
            expected = s_prev + weight * (states[k]["trainable"][name].float() - s_prev)
            torch.testing.assert_close(s_now, expected, atol=1e-6, rtol=1e-5)
    moved = [n for n, s, w in zip(names, states[2]["extra"]["ema"]["shadow"],
                                  (states[2]["trainable"][n] for n in names)) if not torch.equal(s, w)]
    assert moved, "the EMA equals the raw weights"
    ema = dict(zip(names, states[2]["extra"]["ema"]["shadow"]))
    assert _method_run(script, models, data, tmp_path, tmp_path / "b", "--save_ema") == 0
    if script in ("db", "ft"):
        unet = load_file(str(tmp_path / "b" / "last" / "unet" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(unet[k], ema["unet." + k]) for k in unet)
    elif script == "ti":
        assert torch.equal(load_file(str(tmp_path / "b" / "zqx.safetensors"))["emb_params"], ema["emb_params"])
    else:  # XTI: one [2, D] tensor per cross-attention layer, the rows layer-major
        saved = load_file(str(tmp_path / "b" / "zqx.safetensors"))
        rows = ema["emb_params"].view(len(saved), 2, -1)
        assert all(any(torch.equal(v, r) for r in rows) for v in saved.values())


def test_cross_device_update_matches_in_place_update(monkeypatch):
    """The chunked copy-then-lerp path (--ema_device cpu with weights on an accelerator) gives the same EMA
    as the in-place path; a tiny chunk size forces several chunks and one tensor larger than a chunk."""
    import library.training.ema as ema_module

    class Holder:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((3, 4), (50,), (2, 2, 2))]

        def trainable_parameters(self):
            return self.params

        def trainable_state_dict(self):
            return {f"p{i}": p.data for i, p in enumerate(self.params)}

        def load_trainable_state_dict(self, state):
            for i, p in enumerate(self.params):
                p.data.copy_(state[f"p{i}"])

    monkeypatch.setattr(ema_module, "TRANSFER_CHUNK", 16)
    a, b = Holder(), Holder()
    ema_a, ema_b = ExponentialMovingAverage(a, decay=0.9), ExponentialMovingAverage(b, decay=0.9)
    for step in range(1, 4):
        for h in (a, b):
            with torch.no_grad():
                for p in h.params:
                    p.mul_(1.5).add_(0.25)
        ema_a.update(step)
        ema_b.updates += 1
        ema_b._update_across_devices(ema_b._current(), 1 - warmed_decay(0.9, ema_b.updates))
    assert all(torch.equal(x, y) for x, y in zip(ema_a.shadow, ema_b.shadow))
    with ema_a.applied():
        assert all(torch.equal(p.data, s) for p, s in zip(a.params, ema_a.shadow))
    assert all(torch.equal(p.data, q.data) for p, q in zip(a.params, b.params))  # raw weights put back


@pytest.mark.parametrize("case, expected", [
    (["--ema", "--ema_decay", "1.5"], "--ema_decay must be between 0 and 1 (exclusive), got 1.5"),
    (["--ema", "--ema_update_every", "0"], "--ema_update_every must be at least 1, got 0"),
])
def test_option_mistakes_are_one_line_errors(models, data, tmp_path, capsys, case, expected):
    assert run_script(train, base_args(models, data, tmp_path / "out", *case)) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_resume_with_a_foreign_or_missing_ema(models, data, tmp_path, capsys, caplog):
    """A state without an EMA starts it from the resumed weights (a warning); a saved EMA that does not fit
    (other names or shapes) is a one-line error."""
    assert run_script(train, base_args(models, data, tmp_path / "a", "--save_state", "--ema", steps=2)) == 0
    plain = tmp_path / "plain"
    assert run_script(train, base_args(models, data, plain, "--save_state", steps=2)) == 0
    with caplog.at_level("WARNING"):
        assert run_script(train, base_args(models, data, plain, "--save_ema", "--resume", plain / "last-state",
                                           steps=3)) == 0
    assert "the state has no EMA (saved without --ema); the EMA starts from the resumed weights" in caplog.text
    payload = state(tmp_path / "a" / "last-state")
    for what, change, expected in (
            ("names", lambda e: e["names"].reverse(), "the saved EMA does not fit the trained weights of this run"),
            ("shape", lambda e: e["shadow"].__setitem__(0, torch.zeros(7)), "the saved EMA tensor (7,) does not fit")):
        broken = {**payload, "extra": {**payload["extra"], "ema": {k: (list(v) if isinstance(v, list) else v)
                                                                   for k, v in payload["extra"]["ema"].items()}}}
        change(broken["extra"]["ema"])
        folder = tmp_path / what
        folder.mkdir()
        torch.save(broken, folder / "state.pt")
        (folder / "state.json").write_text((tmp_path / "a" / "last-state" / "state.json").read_text())
        capsys.readouterr()
        assert run_script(train, base_args(models, data, tmp_path / "b", "--ema", "--resume", folder, steps=3)) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], errors
