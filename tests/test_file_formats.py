"""Saved files as other tools read them: embedding / network pickles hold only their own tensors and pass
AUTOMATIC1111's default safe unpickler (mimicked below); LoRA and embedding safetensors carry the
``modelspec.*`` (and ``ss_*``) keys the reference writes (docs/train_network.md, docs/train_textual_inversion.md).

AUTOMATIC1111's rules as tested here (modules/safe.py): a zip archive is accepted only if every entry name
matches ``^([^/]+)/((data/\\d+)|version|(data\\.pkl))$``; its ``data.pkl`` (or, for a non-zip file, the
five pickles of torch's legacy format) may name only the globals of :data:`A1111_GLOBALS`.
"""

from __future__ import annotations

import datetime
import importlib
import pathlib
import pickle
import re
import zipfile

import pytest
import torch
from safetensors import safe_open

import train_network
import train_textual_inversion
import train_textual_inversion_XTI
from library import modelspec
from library.methods.textual_inversion import read_embedding_file
from library.methods.xti import read_xti_file
from library.pickle_files import save_pickle, standalone
from networks.lora_common import load_state_dict_file, save_state_dict_file
from tests.train_util import make_dataset, run_script

A1111_ZIP_NAME = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                             "ByteStorage", "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("_codecs", "encode"), ("__builtin__", "set"),
}


class A1111Unpickler(pickle.Unpickler):
    """AUTOMATIC1111's RestrictedUnpickler: allow-listed globals only, storages replaced by empty ones."""

    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        if module == "__builtin__":
            return set
        if module.startswith("numpy"):
            return lambda *args: None  # never reached by our files; numpy moved these modules
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)


def a1111_check(path) -> object:
    """Open ``path`` as AUTOMATIC1111's safe loader does; returns the unpickled object (data empty)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = [n for n in names if not A1111_ZIP_NAME.match(n)]
            if bad:
                raise ValueError(f"bad file inside {path}: {bad[0]}")
            (pkl,) = [n for n in names if re.match(r"^([^/]+)/data\.pkl$", n)]
            with archive.open(pkl) as f:
                return A1111Unpickler(f).load()
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            unpickler = A1111Unpickler(f)
            loaded = [unpickler.load() for _ in range(5)]  # magic, protocol, sys info, object, storage keys
            return loaded[3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.models_util import make_model_files

    root = tmp_path_factory.mktemp("formats")
    models = {name: make_model_files(root / "models", preset, formats="safetensors")["safetensors"]
              for name, preset in (("sd1", "tiny-sd1"), ("sd2", "tiny-sd2"))}
    return {"models": models, "data": make_dataset(root / "data", count=2)}


def train(main, setup, out, *extra, model="sd1"):
    flags = ["--v2", "--v_parameterization"] if model == "sd2" else []
    argv = [*flags, "--pretrained_model_name_or_path", setup["models"][model], "--train_data_dir", setup["data"],
            "--resolution", "64", "--output_dir", out, "--max_train_steps", "1", "--max_data_loader_n_workers", "0",
            "--seed", "1", *extra]
    assert run_script(main, argv) == 0


def ti_args(fmt, *extra):
    return ["--token_string", "zqx", "--init_word", "dog", "--num_vectors_per_token", "2", "--save_model_as", fmt,
            "--learning_rate", "1e-2", *extra]


def table_bytes(model_path) -> int:
    """Bytes of the tiny model's token-embedding table (what a view-saving bug would write)."""
    from safetensors.torch import load_file

    (table,) = [t for k, t in load_file(str(model_path)).items() if k.endswith("token_embedding.weight")]
    return table.numel() * table.element_size()


# ---- the A1111 checker itself ------------------------------------------------------------------------------


def test_the_checker_refuses_what_a1111_refuses(tmp_path, reference_fixtures):
    """Negative controls: current torch's zip archives and foreign globals are refused, the legacy form passes."""
    zipped = tmp_path / "zip.pt"
    torch.save({"emb_params": torch.ones(2, 4)}, zipped)
    with pytest.raises(ValueError, match=r"bad file inside .*(\.format_version|byteorder|\.storage_alignment)"):
        a1111_check(zipped)
    with pytest.raises(ValueError, match="bad file inside"):  # the reference's own .pt embedding
        a1111_check(reference_fixtures / "kohya_sd15_ti_zqx.pt")
    foreign = tmp_path / "foreign.pt"
    save_pickle({"path": pathlib.Path("x"), "t": torch.ones(2)}, foreign)
    with pytest.raises(pickle.UnpicklingError, match="is forbidden"):
        a1111_check(foreign)
    plain = tmp_path / "plain.pt"
    save_pickle({"t": torch.ones(2), "n": None, "s": "x"}, plain)
    assert set(a1111_check(plain)) == {"t", "n", "s"}


def test_standalone_copies_views_only(tmp_path):
    table = torch.randn(1000, 16)
    rows = standalone(table[10:12])
    assert rows.untyped_storage().nbytes() == 2 * 16 * 4 and torch.equal(rows, table[10:12])
    whole = torch.randn(3, 4)
    assert standalone(whole).data_ptr() == whole.data_ptr()  # no copy of a tensor that owns its storage
    save_state_dict_file({"a": table[:2]}, tmp_path / "view.pt")
    assert (tmp_path / "view.pt").stat().st_size < 2048
    assert load_state_dict_file(tmp_path / "view.pt")[0]["a"].shape == (2, 16)


# ---- pickles written by the training scripts ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "ckpt"])
def test_embedding_pickle_is_small_and_a1111_loadable(setup, tmp_path, fmt):
    """Only the two vectors are stored (the bug stored the whole token-embedding table)."""
    out = tmp_path / "out"
    train(train_textual_inversion.main, setup, out, *ti_args(fmt))
    path = out / f"zqx.{fmt}"
    size = path.stat().st_size
    assert size < 4096 and size * 100 < table_bytes(setup["models"]["sd1"]), size
    checked = a1111_check(path)
    assert checked["name"] == "zqx" and set(checked["string_to_param"]) == {"*"}
    safe = torch.load(str(path), map_location="cpu", weights_only=True)
    vectors = safe["string_to_param"]["*"]
    assert vectors.shape == (2, 32) and torch.equal(read_embedding_file(path), vectors)
    assert vectors.untyped_storage().nbytes() == vectors.numel() * vectors.element_size()


def test_xti_pickle_is_small_and_a1111_loadable(setup, tmp_path):
    out = tmp_path / "out"
    train(train_textual_inversion_XTI.main, setup, out, *ti_args("pt"))
    path = out / "zqx.pt"
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    own = sum(t.numel() * t.element_size() for t in data.values())
    assert path.stat().st_size < own + 8192 and path.stat().st_size * 100 < table_bytes(setup["models"]["sd1"])
    assert set(a1111_check(path)) == set(data)
    assert all(torch.equal(read_xti_file(path, list(data))[k], v) for k, v in data.items())


@pytest.mark.parametrize("fmt", ["pt", "ckpt"])
def test_network_pickle_is_a1111_loadable(setup, tmp_path, fmt):
    out = tmp_path / "out"
    train(train_network.main, setup, out, "--network_module", "networks.lora", "--network_dim", "2",
          "--save_model_as", fmt, "--save_precision", "fp16")
    path = out / f"last.{fmt}"
    checked = a1111_check(path)
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    assert set(checked) == set(data) and all(k.startswith(("lora_unet_", "lora_te_")) for k in data)
    assert all(t.dtype == torch.float16 for t in data.values())
    own = sum(t.numel() * t.element_size() for t in data.values())
    assert path.stat().st_size < own * 1.5 + 65536
    weights, _ = load_state_dict_file(path)
    assert all(torch.equal(weights[k], data[k]) for k in data)


# ---- safetensors headers ---------------------------------------------------------------------------------------


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_recent_iso_date(value: str) -> None:
    date = datetime.datetime.fromisoformat(value)
    assert date.microsecond == 0 and abs((datetime.datetime.now() - date).total_seconds()) < 3600


def test_lora_has_every_key_of_the_reference(setup, tmp_path, reference_fixtures):
    out = tmp_path / "out"
    train(train_network.main, setup, out, "--network_module", "networks.lora", "--network_dim", "2",
          "--output_name", "my_lora", "--metadata_author", "Ann", "--metadata_description", "a test",
          "--metadata_license", "CC-BY-4.0", "--metadata_tags", "dog,test", "--clip_skip", "2",
          "--network_args", "conv_dim=2", "conv_alpha=1")
    meta = metadata(out / "my_lora.safetensors")
    for name in ("kohya_sd15_lora_unet.safetensors", "kohya_sd15_lora_te_conv.safetensors"):
        reference = metadata(reference_fixtures / name)
        assert not set(reference) - set(meta), sorted(set(reference) - set(meta))
        for key in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                    "modelspec.prediction_type", "ss_base_model_version"):
            assert meta[key] == reference[key], key
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "my_lora" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.encoder_layer"] == "2" and meta["modelspec.implementation_version"].startswith("sd-train/")
    assert (meta["modelspec.author"], meta["modelspec.description"], meta["modelspec.license"],
            meta["modelspec.tags"]) == ("Ann", "a test", "CC-BY-4.0", "dog,test")
    assert_recent_iso_date(meta["modelspec.date"])


def test_sd2_v_lora_and_metadata_title(setup, tmp_path):
    out = tmp_path / "out"
    train(train_network.main, setup, out, "--network_module", "networks.lora", "--network_dim", "2",
          "--metadata_title", "Shown Title", model="sd2")
    meta = metadata(out / "last.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.title"] == "Shown Title" and meta["modelspec.resolution"] == "64x64"
    assert "modelspec.author" not in meta and "modelspec.encoder_layer" not in meta


def test_embedding_has_every_key_of_the_reference(setup, tmp_path, reference_fixtures):
    out = tmp_path / "out"
    train(train_textual_inversion.main, setup, out, *ti_args("safetensors", "--metadata_license", "MIT"))
    meta = metadata(out / "zqx.safetensors")
    reference = metadata(reference_fixtures / "kohya_sd15_ti_zqx.safetensors")
    assert not set(reference) - set(meta), sorted(set(reference) - set(meta))
    for key in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                "modelspec.prediction_type"):
        assert meta[key] == reference[key], key
    assert meta["modelspec.title"] == "zqx" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.license"] == "MIT"
    assert_recent_iso_date(meta["modelspec.date"])
    with safe_open(str(out / "zqx.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, 32)


def test_modelspec_values_for_each_architecture():
    meta = modelspec.modelspec_metadata(v2=True, v_parameterization=False, adapter="textual-inversion",
                                        title=None, resolution=None, timestamp=1_700_000_000.7)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/textual-inversion"
    assert meta["modelspec.resolution"] == "512x512" and meta["modelspec.title"] == "TextualInversion@1700000000"
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(1_700_000_000).isoformat()
    v_meta = modelspec.modelspec_metadata(v2=True, v_parameterization=True, adapter="lora", title="t",
                                          resolution=None, timestamp=0)
    assert v_meta["modelspec.resolution"] == "768x768" and v_meta["modelspec.prediction_type"] == "v"
    assert modelspec.base_model_version(False, False) == "sd_v1"
    assert modelspec.architecture(False, False) == "stable-diffusion-v1"


def test_reference_pickles_still_load(reference_fixtures):
    """Our readers keep reading the reference's zip-format .pt (written by current torch)."""
    vectors = read_embedding_file(reference_fixtures / "kohya_sd15_ti_zqx.pt")
    assert vectors.shape == (2, 768)
    assert torch.equal(vectors, read_embedding_file(reference_fixtures / "kohya_sd15_ti_zqx.safetensors"))
