"""Start-up with several processes: the dataset scan runs once (main process), latent caching is split.

The helpers of library/distributed.py run in real 2-process gloo groups (torch.multiprocessing); the
end-to-end tests launch train_network.py with ``accelerate launch --num_processes 2`` on the CPU and read
the start-up records of ``--record_training_dir``: who read image headers, who wrote which .npz, a digest of
every latent.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from library.data.group_latents import owner_ranks
from library.data.latents import LatentRequest
from tests.models_util import make_model_files
from tests.test_train_processes import ACCELERATE, REPO
from tests.train_util import free_port, make_dataset


def test_owner_ranks_deal_out_files_and_keep_shared_files_together():
    def request(name, npz=True):
        return LatentRequest(image_path=Path(f"/d/{name}.png"), bucket_reso=(64, 64), resized_size=(64, 64),
                             npz_path=Path(f"/d/{name}.npz") if npz else None)

    requests = [request("a"), request("b"), request("a"), request("c"), request("d")]
    keys = [(0, 0), (0, 1), (1, 0), (0, 2), (0, 3)]
    assert owner_ranks(requests, keys, 2) == [0, 1, 0, 0, 1]  # the second "a" goes with the first
    assert owner_ranks(requests, keys, 1) == [0] * 5
    in_memory = [request("a", npz=False), request("a", npz=False), request("b", npz=False)]
    assert owner_ranks(in_memory, [(0, 0), (1, 0), (0, 1)], 2) == [0, 1, 0]  # by entry without files


def _worker(rank: int, port: int, timeout_s: float, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    from library.distributed import gather_lists, main_computes, wait_for_all
    from library.errors import UserError

    result: dict = {}
    calls = []
    result["value"] = main_computes(lambda: calls.append(rank) or {"sizes": [1, 2]}, "a scan")
    result["calls"] = calls
    def refuse():
        raise UserError("dataset 0 has no usable images")

    try:
        main_computes(refuse, "a scan")
    except UserError as exc:
        result["error"] = str(exc)
    local = list(range(rank * 1000, rank * 1000 + (600 if rank == 0 else 5)))  # rounds of 256, uneven
    result["gathered"] = gather_lists(local, "sharing")
    wait_for_all("a barrier")
    try:  # the main process works longer than the group's timeout: the other one fails with the hint
        main_computes(lambda: time.sleep(timeout_s + 3) or 1, "the slow scan")
        result["slow"] = "finished"
    except UserError as exc:
        result["slow"] = str(exc)
    Path(out, f"r{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # the group is broken after the timeout: do not wait in its destructor


def test_helpers_in_a_two_process_group(tmp_path):
    mp.start_processes(_worker, args=(free_port(), 4.0, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0["value"] == r1["value"] == {"sizes": [1, 2]}
    assert r0["calls"] == [0] and r1["calls"] == []  # the work ran on the main process only
    assert r0["error"] == r1["error"] == "dataset 0 has no usable images"
    expected = [list(range(0, 600)), list(range(1000, 1005))]
    assert r0["gathered"] == r1["gathered"] == expected
    assert "the slow scan" in r1["slow"] and "--ddp_timeout" in r1["slow"]


# ---- end to end: accelerate launch train_network.py ---------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    model = make_model_files(root / "models", "tiny-sd1", formats="safetensors")["safetensors"]
    data = make_dataset(root / "data", folder="3_sks dog", count=5)
    make_dataset(root / "data", folder="2_sks cat", count=3, size=(192, 64))  # a second bucket, 96x32
    return model, data


def _train(inputs, run: Path, processes: int, *extra: str, seed: bool = True) -> Path:
    """One short LoRA run (1 step, or ``extra``'s length options) on a fresh copy of the data; returns the
    record folder (--record_training_dir)."""
    model, data = inputs
    shutil.copytree(data, run / "data")
    debug = run / "record"
    script = [str(REPO / "train_network.py"), "--pretrained_model_name_or_path", str(model),
              "--train_data_dir", str(run / "data"), "--resolution", "64", "--enable_bucket",
              "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
              "--output_dir", str(run / "out"), "--network_module", "networks.lora", "--learning_rate", "1e-3",
              "--record_training_dir", str(debug), *(["--seed", "3"] if seed else []),
              "--max_data_loader_n_workers", "0", "--flip_aug",
              *(extra if "--max_train_epochs" in extra else ["--max_train_steps", "1", *extra])]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *script]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SDTRAIN_CACHE_DIR=str(run / "cache"),
               ACCELERATE_USE_CPU="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return debug


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _digests(debug: Path, rank: int, root: Path) -> dict[str, str]:
    (record,) = _lines(debug / f"startup-latents-rank{rank}.jsonl")
    return {str(Path(k).relative_to(root)): v for k, v in record.items()}


@pytest.mark.slow
def test_two_processes_scan_once_write_each_npz_once_and_match_one_process(inputs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    debug1 = _train(inputs, one, 1, "--cache_latents_to_disk")
    debug2 = _train(inputs, two, 2, "--cache_latents_to_disk")

    assert [r["count"] for r in _lines(debug2 / "startup-image_headers-rank0.jsonl")] == [8]  # every header, once
    assert not (debug2 / "startup-image_headers-rank1.jsonl").exists()  # rank 1 read none
    writes = {r: [Path(x["path"]).relative_to(two) for x in _lines(debug2 / f"startup-latent_writes-rank{r}.jsonl")]
              for r in (0, 1)}
    counts = collections.Counter(writes[0] + writes[1])
    files = sorted(p.relative_to(two) for p in (two / "data").rglob("*.npz"))
    assert len(files) == 16 and sorted(counts) == files and set(counts.values()) == {1}  # 8 images + flips
    assert writes[0] and writes[1] and not set(writes[0]) & set(writes[1])  # split, each file once
    for name in files:  # the same latents as the one-process run
        with np.load(one / name) as a, np.load(two / name) as b:
            assert np.array_equal(a["arr_0"], b["arr_0"]), name
    expected = _digests(debug1, 0, one)
    assert len(expected) == 8
    assert _digests(debug2, 0, two) == _digests(debug2, 1, two) == expected  # and every process holds all


@pytest.mark.slow
def test_two_processes_share_latents_in_memory(inputs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    debug1 = _train(inputs, one, 1, "--cache_latents_to_disk")
    debug2 = _train(inputs, two, 2, "--cache_latents")
    assert not list(debug2.glob("startup-latent_writes-*")) and not list((two / "data").rglob("*.npz"))
    expected = _digests(debug1, 0, one)
    assert _digests(debug2, 0, two) == _digests(debug2, 1, two) == expected


@pytest.mark.slow
def test_without_seed_all_processes_use_one_random_seed(inputs, tmp_path):
    """No --seed: the main process draws it for all, so the ranks split one batch order (each sample of the
    epoch trained exactly once) and end with the same weights."""
    _train(inputs, tmp_path, 2, "--max_train_epochs", "1", "--record_training_dir", str(tmp_path / "record"),
           seed=False)
    ranks = [torch.load(tmp_path / "record" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    seen = collections.Counter(ranks[0]["keys"][1] + ranks[1]["keys"][1])
    assert sorted(collections.Counter(seen.values()).items()) == [(2, 3), (3, 5)], seen  # cats x2, dogs x3
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key


# ---- --dry_run: the step arithmetic of N processes ------------------------------------------------------


def _dry_run(inputs, tmp_path, monkeypatch, world: str | None, name: str) -> dict:
    from tests.train_util import run_script
    from train_network import main as train_network

    model, data = inputs
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("SDTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / f"{name}.json"
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--output_dir", tmp_path / "out", "--network_module", "networks.lora", "--max_train_epochs", "2",
            "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
            "--max_data_loader_n_workers", "0", "--dry_run_json", path]
    assert run_script(train_network, argv) == 0
    return json.loads(path.read_text(encoding="utf-8"))


def test_dry_run_counts_the_launched_processes(inputs, tmp_path, monkeypatch):
    """5 dogs x 3 repeats (bucket 64x64) + 3 cats x 2 repeats (96x32), batch 2: 8 + 3 = 11 batches per epoch.
    One process with accumulation 2: ceil(11 / 2) = 6 steps per epoch of 4 samples; WORLD_SIZE=2 (what
    accelerate launch sets): ceil(11 / 2) = 6 batches per process, ceil(6 / 2) = 3 steps per epoch of 8."""
    one = _dry_run(inputs, tmp_path, monkeypatch, None, "one")["steps"]
    two_report = _dry_run(inputs, tmp_path, monkeypatch, "2", "two")
    two = two_report["steps"]
    assert (one["batches_per_epoch"], one["processes"], one["batches_per_process"]) == (11, 1, 11)
    assert (one["steps_per_epoch"], one["max_train_steps"], one["total_batch_size"]) == (6, 12, 4)
    assert (two["batches_per_epoch"], two["processes"], two["batches_per_process"]) == (11, 2, 6)
    assert (two["steps_per_epoch"], two["max_train_steps"], two["total_batch_size"]) == (3, 6, 8)
    assert any("2 processes: the learning rate is used as given" in n for n in two_report["learning_rate"]["notes"])
