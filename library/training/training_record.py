"""``--record_training_dir DIR``: a record of what a run trained on, for tests and for diagnosing a run.

Every process writes into DIR (created when missing; a folder that already holds a record is refused, so
nothing is overwritten or mixed with another run's lines):

- ``timesteps-rank<r>.jsonl``: one line per batch that process trained on, the JSON list of the timesteps
  the batch drew, in training order;
- ``rank<r>.pt`` when the run ends normally (after the final save): ``{"keys": {epoch: [image key, …]},
  "weights": {name: tensor}}``: the image keys that process trained on per epoch, in order (padding
  batches left out), and the trainable weights as they are in memory after the last step, named as the
  method's ``trainable_state_dict`` names them (with FSDP: gathered, on the main process only; ``{}`` on
  the others);
- ``startup-<what>-rank<r>.jsonl``, written during start-up (library/distributed.py ``record_start_up``):
  ``image_headers`` (one line per image-size scan this process ran, with the number of files),
  ``latent_writes`` (one line per latent ``.npz`` this process wrote) and ``latents`` (a SHA-1 digest of
  every latent this process holds in memory, by image key), so a test can see which process did which
  share of the start-up work.

The option changes nothing about training itself (docs/train_network.md, "training" options).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from library.fileio import atomic_path

RECORD_FILE = "rank{rank}.pt"
TIMESTEP_FILE = "timesteps-rank{rank}.jsonl"
_RECORD_PATTERNS = ("rank*.pt", "timesteps-rank*.jsonl", "startup-*-rank*.jsonl")


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--record_training_dir`` (every training script)."""
    g = parser.add_argument_group("training record (docs/train_network.md)")
    g.add_argument("--record_training_dir", type=str, default=None, metavar="DIR",
                   help="write a record of the run into DIR: per process, the timesteps of every batch "
                        "(timesteps-rank<r>.jsonl) and at the end the image keys trained per epoch and the "
                        "final trainable weights (rank<r>.pt); for tests and diagnosis, changes no result")


def record_problems(args: argparse.Namespace) -> list[str]:
    """``--record_training_dir`` must be a folder (or not exist yet) that holds no earlier record."""
    folder = getattr(args, "record_training_dir", None)
    if not folder:
        return []
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return [f"--record_training_dir {folder}: is a file; give a folder (created when missing)"]
    if path.is_dir():
        earlier = sorted(p.name for pattern in _RECORD_PATTERNS for p in path.glob(pattern))
        if earlier:
            return [f"--record_training_dir {folder}: already holds a training record ({earlier[0]}); give an "
                    "empty or new folder"]
    return []


class TrainingRecord:
    """What one process writes for ``--record_training_dir`` (see the module docstring for the files)."""

    def __init__(self, folder: Path, rank: int):
        """Record process ``rank``'s run into ``folder`` (created when missing)."""
        self.folder, self.rank = Path(folder), rank
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keys: dict[int, list[str]] = {}

    def timesteps(self, timesteps: Sequence[int]) -> None:
        """Append one batch's timesteps as a JSON line to ``timesteps-rank<r>.jsonl``."""
        path = self.folder / TIMESTEP_FILE.format(rank=self.rank)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps([int(t) for t in timesteps]) + "\n")

    def trained(self, epoch: int, keys: Sequence[str]) -> None:
        """Note that a (non-padding) batch of these image keys trained in ``epoch``."""
        self.keys.setdefault(epoch, []).extend(keys)

    def finish(self, weights: dict[str, torch.Tensor]) -> Path:
        """Write ``rank<r>.pt`` with the keys noted and the final ``weights``; returns its path."""
        path = self.folder / RECORD_FILE.format(rank=self.rank)
        with atomic_path(path) as tmp:
            torch.save({"keys": self.keys, "weights": weights}, tmp)
        return path


def make_training_record(folder: str | None, rank: int) -> TrainingRecord | None:
    """The record of process ``rank`` for ``--record_training_dir folder``; None without the option."""
    return TrainingRecord(Path(folder), rank) if folder else None
