"""What the toolkit may replace or delete: only saves it can recognise, never the inputs of the run.

Every place that writes over an existing name or deletes an old save asks this module first:

* :func:`classify` says what an existing path is, from cheap reads only (a safetensors header, the
  entry list of a torch archive, an npz's array names, a folder's listing): a LoRA-family ``network``
  file, an ``embedding``, a whole-model ``checkpoint``, a ``diffusers`` folder that carries our
  manifest (:data:`MANIFEST`), a training ``state`` folder holding only ``state.pt``/``state.json``, a
  ``latents`` cache, or just a ``file`` / ``folder``.
* :func:`check_target` refuses a target that is an input of the run (or holds one) or that is
  something other than a save of the kind about to be written: one line naming the path, what it is,
  and what to do.
* :func:`remove_save` deletes an old save only when it is of the expected kind.

A diffusers folder is recognised by :data:`MANIFEST`, a hidden JSON file listing every file we wrote
into it; a folder whose listing differs from its manifest (a file added or removed by somebody else) is
not ours any more and is never replaced or deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST = ".sdtrain-save.json"
STATE_FILES = frozenset({"state.pt", "state.json", "deepspeed"})  # deepspeed/: --deepspeed engine partitions
TOKENIZER_FILES = frozenset({"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"})
KIND_WORDS = {
    "network": "a LoRA/network file", "embedding": "an embedding file", "checkpoint": "a model checkpoint",
    "diffusers": "a diffusers model folder written by this toolkit", "state": "a training state folder",
    "latents": "a latent cache", "tokenizer": "a saved tokenizer", "file": "a file", "folder": "a folder", "missing": "nothing",
}
_NETWORK_MARKERS = ("lora_down", "lora_up", "hada_w", "lokr_w", "oft_", "dora_scale", "lora_A", "lora_B")
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
_SMALL_PICKLE = 256 << 20  # pickles up to this size may be read whole to classify them
_XTI_LAYER = re.compile(r"^(IN\d\d|MID|OUT\d\d)$")


@dataclass(frozen=True)
class OutputLayout:
    """How a method names its saves: ``<stem><suffix>`` (``suffix`` "/" for a folder) of ``kind``."""

    kind: str
    suffix: str

    def file_name(self, stem: str) -> str:
        """The save's name inside ``--output_dir`` (folders end with "/")."""
        return stem + self.suffix

    def path(self, output_dir: str | os.PathLike, stem: str) -> Path:
        """The save's path."""
        return Path(output_dir) / (stem + self.suffix).rstrip("/")


def _classify_keys(keys: Iterable[str]) -> str:
    """The kind of a weights file from its tensor names."""
    keys = list(keys)
    if not keys:
        return "file"
    if any(k.startswith(_CHECKPOINT_PREFIXES) for k in keys):
        return "checkpoint"
    if all(k.startswith("lora_") or k.startswith("dylora_") for k in keys) or any(
            m in k for k in keys for m in _NETWORK_MARKERS):
        return "network"
    if "emb_params" in keys or "string_to_param" in keys or set(keys) <= {"clip_l", "clip_g"}:
        return "embedding"
    if all(_XTI_LAYER.match(k) for k in keys):  # XTI: one tensor per cross-attention layer (IN01 … OUT11)
        return "embedding"
    return "file"


def _classify_safetensors(path: Path) -> str:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return _classify_keys(handle.keys())
    except Exception:  # noqa: BLE001 - not a readable safetensors file: somebody else's file
        return "file"


def _classify_pickle(path: Path) -> str:
    """A torch archive or legacy pickle: read only when small, weights-only, or by its zip listing."""
    import torch

    try:
        size = path.stat().st_size
        if zipfile.is_zipfile(path):
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        elif size <= _SMALL_PICKLE:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            return "file"
    except Exception:  # noqa: BLE001 - unreadable or not ours
        return "file"
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if isinstance(data, dict) and "string_to_param" in data:
        return "embedding"
    if isinstance(data, dict) and all(isinstance(k, str) for k in data):
        return _classify_keys(data.keys())
    return "file"


def _classify_npz(path: Path) -> str:
    """A latent cache holds a 3-D float ``arr_0`` (or ``latents``); only the array's header is read."""
    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            member = next((f"{k}.npy" for k in ("arr_0", "latents") if f"{k}.npy" in names), None)
            if member is None:
                return "file"
            with archive.open(member) as handle:
                major, _ = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if major == 1
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(handle)
    except Exception:  # noqa: BLE001 - not a readable npz: somebody else's file
        return "file"
    return "latents" if np.issubdtype(dtype, np.floating) and len(shape) == 3 else "file"


def _listing(folder: Path) -> set[str]:
    """Every file below ``folder`` as a relative POSIX path (folders themselves left out)."""
    found = set()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            found.add(Path(root, name).relative_to(folder).as_posix())
    return found


def manifest_files(folder: Path) -> set[str] | None:
    """The files our manifest lists for ``folder`` (None when there is no readable manifest)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return set(data["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(folder: Path, kind: str) -> None:
    """Record every file now in ``folder`` as written by us (call last, inside the temporary folder)."""
    files = sorted(_listing(folder) - {MANIFEST})
    (folder / MANIFEST).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n", encoding="utf-8")


def _classify_folder(path: Path) -> str:
    try:
        entries = {p.name for p in path.iterdir()}
    except OSError:
        return "folder"
    if entries and entries <= STATE_FILES and "state.json" in entries:
        try:
            data = json.loads((path / "state.json").read_text(encoding="utf-8"))
            if isinstance(data, dict) and "global_step" in data:
                return "state"
        except (OSError, ValueError):
            pass
        return "folder"
    if entries and entries <= TOKENIZER_FILES:
        return "tokenizer"
    listed = manifest_files(path)
    if listed is not None and _listing(path) - {MANIFEST} == listed and (path / "model_index.json").is_file():
        return "diffusers"
    return "folder"


def classify(path: str | os.PathLike) -> str:
    """What ``path`` is: one of the keys of :data:`KIND_WORDS` (``missing`` when nothing is there)."""
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return "missing" if not path.is_symlink() else "file"
    if path.is_dir():
        return _classify_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _classify_safetensors(path)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _classify_pickle(path)
    if suffix == ".npz":
        return _classify_npz(path)
    return "file"


def _resolved(path: str | os.PathLike) -> Path | None:
    try:
        return Path(os.path.expanduser(os.fspath(path))).resolve()
    except (OSError, RuntimeError):
        return None


def input_conflict(target: Path, inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> str | None:
    """The option of the first input that ``target`` is, or holds (a folder around it), else None."""
    resolved = _resolved(target)
    if resolved is None:
        return None
    for option, source in inputs:
        if not source:
            continue
        src = _resolved(source)
        if src is None:
            continue
        if src == resolved or resolved in src.parents:
            return f"{option} {source}"
    return None


def check_target(target: str | os.PathLike, kind: str, inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                 *, what: str = "--output_name", may_be_input: bool = False) -> None:
    """UserError unless ``target`` is free or holds an older save of ``kind`` that is no input of the run.

    ``what`` names the option that chose the name (for the message); ``may_be_input`` lets a state
    folder given as ``--resume`` be replaced (it is fully read before training starts).
    """
    target = Path(target)
    if not may_be_input:
        conflict = input_conflict(target, inputs)
        if conflict is not None:
            raise UserError(f"{what}: {target} is {conflict}, an input of this run; it would be replaced — "
                            "choose another output name or folder")
    found = classify(target)
    if found in ("missing", kind):
        return
    raise UserError(f"{what}: {target} already exists and is {KIND_WORDS[found]}, not {KIND_WORDS[kind]}; "
                    "it is left untouched — move it away or choose another output name")


def remove_save(path: str | os.PathLike, kind: str) -> bool:
    """Delete an old save at ``path`` only when it is of ``kind``; returns whether something was removed."""
    path = Path(path)
    found = classify(path)
    if found == "missing":
        return False
    if found != kind:
        logger.warning("kept %s: it is %s, not %s this run saved", path, KIND_WORDS[found], KIND_WORDS[kind])
        return False
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    logger.info("removed old save %s", path)
    return True
