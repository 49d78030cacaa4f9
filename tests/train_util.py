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
def _fsdp_config() -> str:
    from library.training.fsdp_config import fsdp2_accelerate_config

    return fsdp2_accelerate_config(processes=2)


FSDP_CONFIG = _fsdp_config()  # the accelerate config of the FSDP2 tests: 2 processes, full shard


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


def method_files(root: Path) -> dict:
    """Files for the multi-process Textual Inversion / XTI / fine_tune tests: the tiny SD1 model (single file and
    diffusers folder), a TI dataset ``3_zqx`` and a fine-tuning folder with its metadata json."""
    import json

    from tests.models_util import make_model_files

    model = make_model_files(root / "models", "tiny-sd1", formats="safetensors,diffusers_safetensors")
    ti_data = make_dataset(root / "ti", folder="3_zqx", count=5, captions={0: "a zqx on grass", 1: "zqx, running"})
    ft_folder = make_dataset(root / "ft", folder="images", count=5) / "images"
    meta = root / "ft" / "meta.json"
    meta.write_text(json.dumps({f"img{i}": {"caption": f"a photo of sks dog number {i}"} for i in range(5)}),
                    encoding="utf-8")
    return {"model": model, "ti_data": ti_data, "ft": (ft_folder, meta)}


def embedding_args(ti_data: Path, *extra: str) -> tuple[str, ...]:
    """Textual Inversion / XTI options of those tests: token ``zqx`` from ``dog``, 2 vectors, lr 1e-2."""
    return ("--train_data_dir", str(ti_data), "--token_string", "zqx", "--init_word", "dog",
            "--num_vectors_per_token", "2", "--learning_rate", "1e-2", *extra)


def assert_same_tensors(a: dict, b: dict, atol: float) -> None:
    """Same keys in the same order, dtypes and shapes, values within ``atol``."""
    import torch

    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.allclose(a[key], b[key], rtol=0, atol=atol), (key, (a[key] - b[key]).abs().max())


def assert_embedding_loads_in_diffusers(diffusers_model: Path, path: Path, vectors) -> None:
    """``path`` (token ``zqx``, 2 vectors) loads with diffusers' ``load_textual_inversion`` as ``vectors``."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(diffusers_model), local_files_only=True, safety_checker=None)
    pipe.load_textual_inversion(str(path), token="zqx")
    ids = pipe.tokenizer.convert_tokens_to_ids(["zqx", "zqx_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), vectors)


def assert_xti_runs_agree(model_file: Path, sharded: Path, plain: Path, resumed: Path, atol: float) -> None:
    """The XTI files (token ``zqx``, 2 vectors of width 32 per layer) of a sharded run, the plain run and the
    sharded run resumed from its step-2 state: the same keys; every layer within ``atol`` of the plain run,
    trained since step 2, and resumed exactly."""
    import torch
    from safetensors.torch import load_file

    from library.methods import xti
    from library.models.load import load_model

    names = [name for name, _ in xti.cross_attention_layers(load_model(model_file).unet)]
    a = xti.read_xti_file(sharded / "zqx.safetensors", names)
    b = xti.read_xti_file(plain / "zqx.safetensors", names)
    assert list(load_file(str(sharded / "zqx.safetensors"))) == list(load_file(str(plain / "zqx.safetensors")))
    for name in names:
        assert a[name].shape == b[name].shape == (2, 32) and a[name].dtype == b[name].dtype == torch.float32
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), (name, (a[name] - b[name]).abs().max())
    mid = xti.read_xti_file(sharded / "zqx-step00000002.safetensors", names)
    assert all((a[n] - mid[n]).abs().max() > 1e-4 for n in names)  # every layer learned
    c = xti.read_xti_file(resumed / "zqx.safetensors", names)
    assert all(torch.equal(a[n], c[n]) for n in names)


def launch_failure(res) -> str:
    """The end of a failed ``accelerate launch``'s stderr *before* accelerate's own traceback (that one only
    says a child failed; the child's error is above it)."""
    import sys

    err = res.stderr
    own = err.rfind(f'Traceback (most recent call last):\n  File "{Path(sys.executable).with_name("accelerate")}"')
    return (err[:own] if own > 0 else err)[-4000:]


def assert_fine_tune_runs_agree(base: Path, sharded: Path, plain: Path, resumed: Path, atol: float) -> None:
    """The ``last/`` diffusers folders of a sharded fine_tune.py run (UNet only), the plain run and the sharded
    run resumed from its step-2 state; ``base``: the diffusers folder they started from. The UNet is within
    ``atol`` of the plain run, trained, loads with diffusers and is resumed exactly; the text encoder is the
    base model's, bit for bit, in the prefixed layout."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet_file = Path("last") / "unet" / "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(sharded / unet_file)), load_file(str(plain / unet_file))
    assert_same_tensors(a, b, atol)
    base_unet = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], base_unet[k]) for k in a)  # it trained
    te = load_file(str(sharded / "last" / "text_encoder" / "model.safetensors"))
    base_te = load_file(str(base / "text_encoder" / "model.safetensors"))
    assert te.keys() == base_te.keys() and all(torch.equal(te[k], base_te[k]) for k in te)
    assert all(k.startswith("text_model.") for k in te)  # the prefixed layout the ecosystem reads
    unet = UNet2DConditionModel.from_pretrained(str(sharded / "last" / "unet"))
    assert all(torch.equal(v, a[k]) for k, v in unet.state_dict().items())
    c = load_file(str(resumed / unet_file))
    assert all(torch.equal(a[k], c[k]) for k in a)  # resumed from the sharded state
