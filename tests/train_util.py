"""Helpers for end-to-end training tests: tiny models, small datasets, running a script in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from library.cli import run_main
from library.training.training_record import RECORD_FILE, TIMESTEP_FILE


def make_dataset(root: Path, folder: str = "5_sks dog", count: int = 4, size: tuple[int, int] = (64, 64),
                 captions: dict[int, str] | None = None) -> Path:
    """``root/<folder>/`` with ``count`` random images (and optional caption files); returns ``root``."""
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i + 17)
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(target / f"img{i}.png")
    for i, text in (captions or {}).items():
        (target / f"img{i}.caption").write_text(text, encoding="utf-8")
    return root


def run_script(main, argv: Sequence[str | Path]) -> int:
    """Run an entry script's main() in this process, as the command line would."""
    return run_main(main, [str(a) for a in argv])


def record_args(folder: Path) -> list[str]:
    """The options that make a run write its training record into ``folder`` (``--record_training_dir``)."""
    return ["--record_training_dir", str(folder)]


def read_record(folder: Path, rank: int = 0) -> dict:
    """Process ``rank``'s ``--record_training_dir`` record: ``{"keys": {epoch: [image key, ...]}, "weights":
    {name: tensor}}`` (the image keys it trained on per epoch, in order, and its final trainable weights)."""
    import torch

    return torch.load(Path(folder) / RECORD_FILE.format(rank=rank), map_location="cpu", weights_only=False)


def recorded_timesteps(folder: Path, rank: int = 0) -> list[int]:
    """Every timestep process ``rank`` drew, in training order (``--record_training_dir``'s jsonl file)."""
    import json

    lines = (Path(folder) / TIMESTEP_FILE.format(rank=rank)).read_text(encoding="utf-8").splitlines()
    return [t for line in lines for t in json.loads(line)]


def runs_once(tmp_path_factory, main, argv_for):
    """``get(case)`` → the output folder of ``main(argv_for(out, case))``, run once per case and kept (for
    module-scoped fixtures that several tests read)."""
    runs: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in runs:
            out = tmp_path_factory.mktemp(case)
            assert run_script(main, argv_for(out, case)) == 0
            runs[case] = out
        return runs[case]

    return get


def write_bucket_config(path: Path, image_dir: Path) -> Path:
    """A one-subset DreamBooth TOML with bucketing (64-128 px), batch size 2 and 2 repeats."""
    path.write_text(f"""[general]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{image_dir}'
  class_tokens = 'sks dog'
  num_repeats = 2
""", encoding="utf-8")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for accelerate's --main_process_port in multi-process tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: accelerate's FSDP config for 2 CPU processes (tests/test_fsdp*.py); ``.format(version=2)``
FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: {version}
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
  fsdp_state_dict_type: FULL_STATE_DICT
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: false
"""


def plain_launch(processes: int = 2) -> list[str]:
    """``accelerate launch`` options for ``processes`` plain processes, no mixed precision, no dynamo."""
    how = ["--multi_gpu"] if processes > 1 else []
    return [*how, "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def accelerate_launch(how: Sequence[str], script: Path, args: Sequence[str], out: Path, *, timeout: int = 900):
    """Run ``accelerate launch <how> script <args>`` on the CPU (``OMP_NUM_THREADS=1``, a cache folder beside
    ``out``); once more only when another process took the free port in the meantime. Returns the
    CompletedProcess (its returncode is not checked)."""
    import os
    import subprocess
    import sys

    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1",
               SDTRAIN_CACHE_DIR=str(out.parent / f"{out.name}-cache"))
    for _ in range(2):
        cmd = [str(accelerate), "launch", *how, "--main_process_port", str(free_port()), str(script),
               *map(str, args)]
        res = subprocess.run(cmd, cwd=Path(script).parent, env=env, capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode == 0 or "address already in use" not in res.stderr.lower():
            break
    return res
