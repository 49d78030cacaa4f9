"""Nothing the user made is replaced or deleted: outputs named like inputs or like the user's own files,
retention, latent-cache names, leftovers of killed runs, output folders that cannot be written, full disks.

Every case plants the user's file first and checks afterwards that it is byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from networks import merge_lora
from tests.train_util import make_dataset, run_script
from train_db import main as train_db
from train_network import main as train_network


def fingerprint(path: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under ``path`` (or of the file itself)."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_line(capsys, *parts: str) -> str:
    text = capsys.readouterr().err
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in text, text[-2000:]
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), captions={0: "sks dog, grass"})


def lora_args(model, data, out, *extra, steps=2):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "2",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def db_args(model, data, out, *extra, steps=1):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--output_dir", out, "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


@pytest.fixture
def model_copy(models, tmp_path):
    """A private copy of the tiny SD1 model (ldm file and diffusers folder) that a test may aim at."""
    root = tmp_path / "models"
    root.mkdir()
    file = root / "base.safetensors"
    shutil.copy(models["sd1"]["safetensors"], file)
    folder = root / "base"
    shutil.copytree(models["sd1"]["diffusers"], folder)
    return file, folder


# ---- outputs named like the inputs ------------------------------------------------------------------------

def test_diffusers_output_named_like_the_image_folder_is_refused(models, data, capsys):
    before = fingerprint(data)
    argv = db_args(models["sd1"]["safetensors"], data, data, "--save_model_as", "diffusers",
                   "--output_name", "5_sks dog")
    assert run_script(train_db, argv) == 2
    one_line(capsys, "5_sks dog", "input of this run")
    assert fingerprint(data) == before


def test_diffusers_output_named_like_the_base_model_folder_is_refused(model_copy, data, tmp_path, capsys):
    _, folder = model_copy
    before = fingerprint(folder)
    argv = db_args(folder, data, folder.parent, "--save_model_as", "diffusers", "--output_name", "base")
    assert run_script(train_db, argv) == 2
    one_line(capsys, str(folder), "--pretrained_model_name_or_path")
    assert fingerprint(folder) == before


@pytest.mark.parametrize("script", ["lora", "db"])
def test_output_named_like_the_base_model_file_is_refused(model_copy, data, capsys, script):
    file, _ = model_copy
    before = fingerprint(file)
    if script == "lora":  # a LoRA written over the checkpoint
        code = run_script(train_network, lora_args(file, data, file.parent, "--output_name", "base"))
    else:  # a trained checkpoint written over its own base model
        code = run_script(train_db, db_args(file, data, file.parent, "--save_model_as", "safetensors",
                                            "--output_name", "base"))
    assert code == 2
    one_line(capsys, "base.safetensors", "input of this run")
    assert fingerprint(file) == before


def test_output_named_like_the_network_weights_is_refused(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, out, steps=1)) == 0
    before = fingerprint(out / "last.safetensors")
    argv = lora_args(models["sd1"]["safetensors"], data, out, "--network_weights", out / "last.safetensors", steps=1)
    assert run_script(train_network, argv) == 2
    one_line(capsys, "--network_weights")
    assert fingerprint(out / "last.safetensors") == before


# ---- our own saves are replaced, the user's are not ----------------------------------------------------------

def test_own_diffusers_save_is_replaced_but_not_once_the_user_added_a_file(models, data, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    argv = db_args(models["sd1"]["safetensors"], data, out, "--save_model_as", "diffusers")
    assert run_script(train_db, argv) == 0
    assert (out / "last" / ".sdtrain-save.json").is_file()
    StableDiffusionPipeline.from_pretrained(out / "last", safety_checker=None)  # diffusers ignores the manifest
    assert run_script(train_db, argv) == 0  # a re-run replaces its own earlier save
    assert not any(p.name.startswith(".last") for p in out.iterdir())
    (out / "last" / "notes.txt").write_text("my notes", encoding="utf-8")
    before = fingerprint(out / "last")
    assert run_script(train_db, argv) == 2
    one_line(capsys, "last", "left untouched")
    assert fingerprint(out / "last") == before


@pytest.mark.parametrize("planted", ["file", "folder"])
def test_foreign_item_at_a_save_name_stops_before_training(models, data, tmp_path, capsys, planted):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "last.safetensors"
    if planted == "file":
        target.write_bytes(b"my own bytes")
    else:
        target.mkdir()
        (target / "keep.txt").write_text("x", encoding="utf-8")
    before = fingerprint(target)
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, out)) == 2
    one_line(capsys, str(target), "left untouched")
    assert fingerprint(target) == before
    assert sorted(p.name for p in out.iterdir()) == ["last.safetensors"]


def test_state_name_held_by_a_file_is_refused(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last-state").write_text("mine", encoding="utf-8")
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, out, "--save_state")) == 2
    one_line(capsys, "--save_state", "last-state")
    assert (out / "last-state").read_text(encoding="utf-8") == "mine"


def test_retention_deletes_only_this_runs_saves(models, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    planted = {"at-step00000001.txt": b"notes", "at-step00000001.safetensors.bak": b"backup",
               "at-step00000001-state.txt": b"state notes", "at-step00000001.png": b"image"}
    for name, content in planted.items():
        (out / name).write_bytes(content)
    (out / "at-step00000001.d").mkdir()
    (out / "at-step00000001.d" / "f").write_bytes(b"inside")
    argv = lora_args(models["sd1"]["safetensors"], data, out, "--save_every_n_steps", "1",
                     "--save_last_n_steps", "1", "--save_state", steps=4)
    assert run_script(train_network, argv) == 0
    names = {p.name for p in out.iterdir()}
    assert "at-step00000001.safetensors" not in names and "at-step00000001-state" not in names  # retention ran
    assert {"at-step00000003.safetensors", "last.safetensors", "last-state"} <= names
    for name, content in planted.items():
        assert (out / name).read_bytes() == content
    assert (out / "at-step00000001.d" / "f").read_bytes() == b"inside"


def test_state_folders_of_an_earlier_run_are_replaced_in_place(models, data, tmp_path):
    out = tmp_path / "out"
    argv = lora_args(models["sd1"]["safetensors"], data, out, "--save_state", "--save_every_n_steps", "1", steps=3)
    assert run_script(train_network, argv) == 0
    inodes = {name: (out / name).stat().st_ino for name in ("at-step00000002-state", "last-state")}
    resumed = [*argv, "--resume", out / "at-step00000001-state"]
    assert run_script(train_network, resumed) == 0  # writes step-2 and last states again, over the earlier ones
    for name, inode in inodes.items():
        assert (out / name).stat().st_ino != inode and (out / name / "state.pt").is_file()
    assert (out / "at-step00000001-state" / "state.pt").is_file()  # the resumed state itself is kept
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(models, data, tmp_path):
    out = tmp_path / "out"
    leftover = out / ".last.safetensors.sdtrain-ab12cd34.tmp"
    leftover.mkdir(parents=True)
    (leftover / "last.safetensors").write_bytes(b"half written")
    mine = out / ".last.safetensors.mine.tmp"
    mine.write_bytes(b"user's hidden file")
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, out, steps=1)) == 0
    assert not leftover.exists()
    assert mine.read_bytes() == b"user's hidden file"


# ---- latent caches ------------------------------------------------------------------------------------------

def test_latent_cache_never_replaces_a_users_npz_and_same_stems_get_their_own_files(models, tmp_path):
    root = make_dataset(tmp_path / "data", count=3)
    images = root / "5_sks dog"
    Image.open(images / "img2.png").convert("RGB").save(images / "img0.jpg", quality=95)  # same stem as img0.png
    np.savez(images / "img1.npz", mine=np.arange(5))  # the user's own npz, no latent cache
    user_npz = fingerprint(images / "img1.npz")
    leftover = images / ".img2.npz.sdtrain-zz99yy88.tmp"
    leftover.write_bytes(b"half")
    out = tmp_path / "out"
    argv = lora_args(models["sd1"]["safetensors"], root, out, "--cache_latents_to_disk", "--flip_aug", steps=1)
    assert run_script(train_network, argv) == 0
    assert fingerprint(images / "img1.npz") == user_npz
    made = {p.name for p in images.glob("*.npz")}
    assert made == {"img0.png.npz", "img0.png_flip.npz", "img0.jpg.npz", "img0.jpg_flip.npz", "img1.npz",
                    "img1.png.npz", "img1.png_flip.npz", "img2.npz", "img2_flip.npz"}
    assert not np.array_equal(np.load(images / "img0.png.npz")["arr_0"], np.load(images / "img0.jpg.npz")["arr_0"])
    assert not leftover.exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in images.glob("*.npz")}
    assert run_script(train_network, argv) == 0  # the second run finds its caches under the same names
    assert {p.name: p.stat().st_mtime_ns for p in images.glob("*.npz")} == stamps


# ---- the LoRA tools --------------------------------------------------------------------------------------------

def test_merge_lora_refuses_to_replace_a_file_that_is_no_lora(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, out, steps=1)) == 0
    lora = out / "last.safetensors"
    target = tmp_path / "photo.safetensors"
    target.write_bytes(b"\x89PNG not a lora")
    argv = ["--models", lora, "--ratios", "0.5", "--save_to", target]
    assert run_script(merge_lora.main, argv) == 2
    one_line(capsys, "--save_to", "photo.safetensors", "left untouched")
    assert target.read_bytes() == b"\x89PNG not a lora"
    older = tmp_path / "older.safetensors"
    shutil.copy(lora, older)  # an earlier merge result: a LoRA may be replaced
    assert run_script(merge_lora.main, ["--models", lora, "--ratios", "0.5", "--save_to", older]) == 0
    assert older.read_bytes() != lora.read_bytes()


# ---- output folders that cannot be written, full disks --------------------------------------------------------

def test_output_dir_that_is_a_file_or_below_one(models, data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    for out, words in ((blocker, "is a file"), (blocker / "sub", "lies below the file")):
        assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, out)) == 2
        one_line(capsys, "--output_dir", words)
    assert blocker.read_text(encoding="utf-8") == "x"


def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    source, target = tmp_path / "src", tmp_path / "ro"
    source.mkdir()
    target.mkdir()
    if not (_mount(["--bind", str(source), str(target)]) and _mount(["-o", "remount,bind,ro", str(target)])):
        subprocess.run(["umount", str(target)], capture_output=True)
        pytest.skip("bind mounts are not allowed here (needs root in a mount namespace)")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_read_only_output_dir_stops_before_the_model_loads(models, data, read_only_dir, capsys):
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, read_only_dir)) == 2
    one_line(capsys, "--output_dir", "Read-only file system (EROFS)")


@pytest.fixture
def small_disk(tmp_path):
    def mount(size_bytes: int) -> Path:
        target = tmp_path / "disk"
        target.mkdir()
        if not _mount(["-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(target)]):
            pytest.skip("tmpfs mounts are not allowed here (needs root in a mount namespace)")
        mounted.append(target)
        return target

    mounted: list[Path] = []
    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=True)


def test_full_disk_while_saving_keeps_the_previous_save(models, data, tmp_path, small_disk, capsys):
    first = tmp_path / "first"
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, first, steps=1)) == 0
    size = (first / "last.safetensors").stat().st_size
    disk = small_disk(((size * 3 // 2) // 4096 + 1) * 4096)  # room for one save, not for a second beside it
    shutil.copy(first / "last.safetensors", disk / "last.safetensors")
    before = fingerprint(disk / "last.safetensors")
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, disk, steps=1)) == 2
    line = one_line(capsys, "last.safetensors", "No space left on device (ENOSPC)", "nothing was replaced")
    assert "--save_state keeps one" in line
    assert fingerprint(disk / "last.safetensors") == before
    assert sorted(os.listdir(disk)) == ["last.safetensors"]  # the temporary is gone


# ---- the pieces: what is recognised, how folders are replaced ------------------------------------------------

def test_the_references_files_are_recognised(reference_fixtures):
    from library.output_safety import classify

    assert classify(reference_fixtures / "kohya_sd15_lora_unet.safetensors") == "network"
    assert classify(reference_fixtures / "kohya_sd15_lora_te_conv.safetensors") == "network"
    assert classify(reference_fixtures / "kohya_sd15_ti_zqx.safetensors") == "embedding"
    assert classify(reference_fixtures / "kohya_sd15_ti_zqx.pt") == "embedding"
    assert classify(reference_fixtures / "README.md") == "file"


def test_models_and_folders_are_recognised(models, tmp_path):
    from library.output_safety import classify

    assert classify(models["sd1"]["safetensors"]) == "checkpoint"
    assert classify(models["sd1"]["diffusers"]) == "diffusers"  # written by our converter, with its manifest
    copy = tmp_path / "copy"
    shutil.copytree(models["sd1"]["diffusers"], copy)
    (copy / "unet" / "extra.txt").write_text("x", encoding="utf-8")
    assert classify(copy) == "folder"  # changed since: no longer provably ours
    assert classify(tmp_path / "nothing") == "missing"
    state = tmp_path / "s"
    state.mkdir()
    (state / "state.json").write_text('{"global_step": 3}', encoding="utf-8")
    assert classify(state) == "state"
    (state / "mine.txt").write_text("x", encoding="utf-8")
    assert classify(state) == "folder"


def test_atomic_folder_replacement_swaps_names_and_refuses_foreign_folders(tmp_path):
    from library.errors import UserError
    from library.fileio import _exchange, atomic_path

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a", encoding="utf-8")
    (b / "x").write_text("b", encoding="utf-8")
    if not _exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available: the two-rename fallback is used")
    assert (a / "x").read_text(encoding="utf-8") == "b" and (b / "x").read_text(encoding="utf-8") == "a"

    target = tmp_path / "last-state"
    for step in (1, 2):
        with atomic_path(target, replace_kind="state") as tmp:
            tmp.mkdir()
            (tmp / "state.json").write_text(f'{{"global_step": {step}}}', encoding="utf-8")
    assert (target / "state.json").read_text(encoding="utf-8") == '{"global_step": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "last-state"]
    (target / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="left untouched"):
        with atomic_path(target, replace_kind="state") as tmp:
            tmp.mkdir()
            (tmp / "state.json").write_text('{"global_step": 3}', encoding="utf-8")
    assert (target / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "last-state"]

