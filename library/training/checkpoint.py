"""File names, retention and the training state that makes ``--resume`` exact.

A state folder holds ``state.pt`` (trainable weights, optimizer, scheduler, every RNG, the step, the
epoch and the position inside the epoch) and ``state.json`` (the same counters, readable). Resuming
restores all of it, so N steps straight and k steps + resume to N give bit-identical weights.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.errors import UserError
from library.fileio import atomic_path

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
STATE_VERSION = 1


@dataclass
class TrainProgress:
    """Where a run is: the counters that a resumed run continues from."""

    global_step: int = 0
    epoch: int = 1          # current epoch, counted from 1
    position: int = 0       # index of the next batch of this process inside the epoch
    micro_step: int = 0     # micro-batches since the last optimizer step (0 at every saved state)
    session_id: int = 0
    started_at: float = 0.0
    seed: int = 0


def epoch_name(stem: str | None, epoch: int) -> str:
    """``<name>-<epoch:06d>`` (default stem ``epoch``)."""
    return f"{stem or 'epoch'}-{epoch:06d}"


def step_name(stem: str | None, step: int) -> str:
    """``<name>-step<step:08d>`` (default stem ``at``)."""
    return f"{stem or 'at'}-step{step:08d}"


def final_name(stem: str | None) -> str:
    """``<name>`` (default ``last``)."""
    return stem or "last"


def epoch_to_remove(epoch: int, every: int | None, keep: int | None) -> int | None:
    """Which older epoch save ``--save_last_n_epochs`` deletes after saving ``epoch`` (or None)."""
    if not keep or not every:
        return None
    old = epoch - every * keep
    return old if old > 0 else None


def step_to_remove(step: int, every: int | None, keep: int | None) -> int | None:
    """Which older step save ``--save_last_n_steps`` deletes after saving ``step`` (or None):
    ``r - r % every`` with ``r = step - keep - 1``, when that is a real (positive) step."""
    if not keep or not every:
        return None
    r = step - keep - 1
    if r < 0:
        return None
    old = r - r % every
    return old if old > 0 else None


def rng_states(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy, torch (CPU, CUDA) states, and a noise generator's when one is given (the trainer has none:
    its noise is seeded per sample)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if generator is not None:
        states["noise"] = generator.get_state()
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`rng_states` (a saved noise generator state is restored only into a given generator)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if generator is not None and "noise" in states:
        generator.set_state(states["noise"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(folder: Path, *, progress: TrainProgress, trainable: dict[str, torch.Tensor], optimizer: Any,
               scheduler: Any, generator: torch.Generator | None = None, scaler: Any = None,
               extra: dict | None = None) -> Path:
    """Write a state folder atomically; an existing state folder of that name is replaced in one step (the
    name never points at nothing), anything else there is refused (:mod:`library.fileio`)."""
    payload = {
        "version": STATE_VERSION, "progress": asdict(progress),
        "trainable": {k: v.detach().cpu().clone() for k, v in trainable.items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_states(generator), "scaler": scaler.state_dict() if scaler is not None else None,
        "extra": extra or {},
    }
    with atomic_path(folder, replace_kind="state") as tmp:
        tmp.mkdir()
        torch.save(payload, tmp / STATE_FILE)
        (tmp / "state.json").write_text(json.dumps(asdict(progress), indent=2) + "\n", encoding="utf-8")
    logger.info("saved training state to %s", folder)
    return folder


def load_state(folder: str | Path) -> dict[str, Any]:
    """Read a state folder written by :func:`save_state`; a missing or foreign folder is a UserError."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume {folder}: no {STATE_FILE} in that folder (expected a folder written with "
                        "--save_state, e.g. last-state/ or <name>-step00000100-state/)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem to the user
        raise UserError(f"--resume {folder}: cannot read {STATE_FILE} ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("version") != STATE_VERSION:
        raise UserError(f"--resume {folder}: state written by an incompatible version")
    payload["progress"] = TrainProgress(**payload["progress"])
    return payload


PROCESSES_KEY = "processes"  # in a state's "extra": the number of processes that trained it


def check_processes(payload: dict[str, Any], folder: str | Path, processes: int) -> None:
    """Refuse resuming a state written by another number of processes (states that do not record it, from
    older versions, are accepted): its place in the epoch counts each process's own batches, and each step
    trained one batch per process, so another number could continue neither run exactly."""
    recorded = (payload.get("extra") or {}).get(PROCESSES_KEY)
    if recorded is not None and int(recorded) != processes:
        raise UserError(f"--resume {folder}: this state was written by {recorded} process(es), this run has "
                        f"{processes}; resume with {recorded}, or start a new run from the last saved weights "
                        "(--network_weights, --weights or the saved model) to go on with another number")
