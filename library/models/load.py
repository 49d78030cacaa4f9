"""Load a Stable Diffusion 1.x/2.x model: ldm single file, diffusers folder, or Hugging Face Hub id.

Single-file checkpoints are converted tensor by tensor into modules created on the meta device, so the
peak memory stays close to one copy of the weights. Component configs come from ``--reference_model``
(a diffusers folder) when given, otherwise from the weight shapes (which reproduces the bundled SD1.5 /
SD2 configs for real checkpoints and the tiny configs for test models).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from library.errors import UserError
from library.models import convert, detect
from library.models.presets import ModelConfigs, scheduler_config
from library.models.statedict import LazyStateDict, open_state_dict

logger = logging.getLogger(__name__)

_FAMILY_PROBLEMS = {
    "lora": "is a LoRA network file, not a Stable Diffusion model (give it to --network_weights instead)",
    "sdxl": "is an SDXL checkpoint; only Stable Diffusion 1.x and 2.x are supported",
    "vae_only": "holds only VAE weights, not a whole Stable Diffusion model (give it to --vae instead)",
    "not_sd": "holds no Stable Diffusion UNet weights (no 'model.diffusion_model.' keys)",
}


@dataclass
class StableDiffusionModel:
    """The loaded components of one model and what is known about it."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    configs: ModelConfigs
    source: str
    source_format: str  # "ldm" or "diffusers"
    scheduler_config: dict

    @property
    def v2(self) -> bool:
        """True for an SD2.x model (OpenCLIP text encoder)."""
        return self.configs.v2

    @property
    def v_parameterization(self) -> bool:
        """True when the model is trained/sampled with the v-prediction target."""
        return self.configs.v_parameterization


def _empty_module(cls, config: dict, source: str):
    """Instantiate a module with parameters on the meta device (buffers stay real).

    A config the library cannot build (e.g. widths its normalisation groups do not divide) is a
    UserError naming ``source``.
    """
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            if cls.__name__ == "CLIPTextModel":
                from transformers import CLIPTextConfig

                return cls(CLIPTextConfig(**config))
            return cls.from_config(config)
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{source}: cannot build the {cls.__name__} of this architecture ({first}); "
                        "check --v2 / --reference_model") from None


def fill_module(module: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, source: str,
                component: str, dtype: torch.dtype | None) -> torch.nn.Module:
    """Assign converted tensors to a meta-initialised module, checking every key and shape.

    Raises UserError naming the file, the component and the first mismatching key when the weights do
    not fit the architecture (wrong SD version, wrong --reference_model, a file of another kind).
    """
    expected = module.state_dict()
    params = {name for name, _ in module.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in tensors:
        want = expected.get(key)
        if want is None:
            unexpected.append(key)
            continue
        if tuple(want.shape) != tuple(tensor.shape):
            raise UserError(f"{source}: {component} weight '{key}' has shape {tuple(tensor.shape)} but the "
                            f"architecture expects {tuple(want.shape)}; check --v2 / --reference_model")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype or (want.dtype if want.dtype.is_floating_point else torch.float32))
        state[key] = tensor
    missing = sorted(params - state.keys())
    if missing or unexpected:
        detail = (f"missing {len(missing)} weights (e.g. '{missing[0]}')" if missing
                  else f"{len(unexpected)} unexpected weights (e.g. '{unexpected[0]}')")
        raise UserError(f"{source}: the {component} weights do not fit the architecture: {detail}; "
                        "check --v2 / --reference_model")
    module.load_state_dict(state, strict=False, assign=True)
    return module


def configs_from_diffusers_folder(folder: Path, v_parameterization: bool) -> ModelConfigs:
    """Read the UNet, VAE and text-encoder configs of a diffusers model folder."""
    def read(sub: str) -> dict:
        path = folder / sub / "config.json"
        if not path.is_file():
            raise UserError(f"{folder}: missing {sub}/config.json (is it a diffusers Stable Diffusion folder?)")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None

    unet, vae, te = read("unet"), read("vae"), read("text_encoder")
    return ModelConfigs(unet, vae, te, v2=is_v2_text_encoder(te), v_parameterization=v_parameterization)


def is_v2_text_encoder(te_config: dict) -> bool:
    """SD2's OpenCLIP text encoder uses GELU (and is 1024 wide); SD1's CLIP ViT-L uses quick GELU."""
    return int(te_config.get("hidden_size", 768)) == 1024 or te_config.get("hidden_act") == "gelu"


def _file_prediction_type(metadata: dict[str, str]) -> str | None:
    """'v' or 'epsilon' when a safetensors header says which (modelspec), else None."""
    pred = metadata.get("modelspec.prediction_type")
    if pred:
        return "v" if pred.startswith("v") else "epsilon"
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-v2"):
        return "v" if arch.endswith("-v") else "epsilon"
    return None


def resolve_flags(source: str, v2_flag: bool | None, v2_detected: bool, v_flag: bool | None,
                  v_detected: bool | None) -> bool:
    """Warn where the user's --v2 / --v_parameterization disagree with the model; return the prediction
    type to use (the flag when given, else what the model says, else epsilon)."""
    if v2_flag is not None and v2_flag != v2_detected:
        logger.warning("%s is an SD%s model but --v2 was %s; using SD%s as found in the weights",
                       source, "2.x" if v2_detected else "1.x", "given" if v2_flag else "not given",
                       "2.x" if v2_detected else "1.x")
    if v_flag is None:
        return bool(v_detected)
    if v_detected is not None and v_detected != v_flag:
        logger.warning("%s says it is a %s model but --v_parameterization was %s; training uses %s as requested",
                       source, "v-prediction" if v_detected else "epsilon-prediction",
                       "given" if v_flag else "not given", "v-prediction" if v_flag else "epsilon-prediction")
    return v_flag


def load_ldm_checkpoint(path: Path, *, v2: bool | None, v_parameterization: bool | None, reference_model: str | None,
                        dtype: torch.dtype | None) -> tuple[Any, Any, Any, ModelConfigs, LazyStateDict]:
    """Load UNet, VAE and text encoder from an ldm single-file checkpoint (.ckpt/.safetensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    sd = open_state_dict(path)
    family = detect.detect_ldm_family(sd.keys())
    if family in _FAMILY_PROBLEMS:
        raise UserError(f"{path} {_FAMILY_PROBLEMS[family]}")
    v2_detected = family == "sd2"
    pred = _file_prediction_type(sd.metadata)
    v_parameterization = resolve_flags(str(path), v2, v2_detected, v_parameterization,
                                       None if pred is None else pred == "v")
    if reference_model:
        configs = configs_from_diffusers_folder(_local_folder(reference_model, "--reference_model"),
                                                v_parameterization)
        if configs.v2 != v2_detected:
            raise UserError(f"--reference_model {reference_model} is an SD{'2' if configs.v2 else '1'} model "
                            f"but {path} is SD{'2' if v2_detected else '1'}")
    else:
        try:
            configs = detect.infer_configs_from_ldm(sd.shapes())
        except ValueError as exc:
            raise UserError(f"{path}: cannot tell the architecture from the weights ({exc}); pass the original "
                            f"model's diffusers folder (or a folder with its unet/, vae/ and text_encoder/ "
                            f"config.json files) with --reference_model") from None
    configs = replace(configs, v_parameterization=v_parameterization)
    plan = convert.ldm_to_diffusers_plan(sd.keys(), configs)
    unet = fill_module(_empty_module(UNet2DConditionModel, configs.unet, str(path)),
                       convert.apply_plan(plan["unet"], sd.__getitem__), source=str(path), component="UNet",
                       dtype=dtype)
    vae = fill_module(_empty_module(AutoencoderKL, configs.vae, str(path)),
                      convert.apply_plan(plan["vae"], sd.__getitem__), source=str(path), component="VAE", dtype=dtype)
    te = _empty_module(CLIPTextModel, configs.text_encoder, str(path))
    te_tensors = convert.apply_plan(plan["text_encoder"], sd.__getitem__)
    te = fill_module(te, _to_module_keys(te_tensors, te), source=str(path), component="text encoder", dtype=dtype)
    return unet, vae, te, configs, sd


def _to_module_keys(tensors: Iterator[tuple[str, torch.Tensor]], module) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename canonical (``text_model.``-prefixed) text-encoder keys to the installed module's own names."""
    own = next(iter(module.state_dict()))
    prefixed = own.startswith("text_model.")
    for key, tensor in tensors:
        if not prefixed and key.startswith("text_model."):
            key = key[len("text_model."):]
        elif prefixed and not key.startswith("text_model."):
            key = "text_model." + key
        yield key, tensor


def _local_folder(path: str, option: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{option} {path}: no such folder (a local diffusers model folder is required)")
    return folder


def _from_pretrained(cls, where: str, subfolder: str | None, dtype: torch.dtype | None, local: bool, **kw):
    kwargs: dict[str, Any] = dict(local_files_only=local, **kw)
    if subfolder:
        kwargs["subfolder"] = subfolder
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        return cls.from_pretrained(where, **kwargs)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if not local:
            raise UserError(f"{where}: not a local file or folder, and it could not be fetched from the "
                            f"Hugging Face Hub (offline?): {first}") from None
        raise UserError(f"{where}: cannot load {subfolder or 'model'}: {first}") from None


def load_diffusers_model(where: str, *, local: bool, v2: bool | None, v_parameterization: bool | None,
                         dtype: torch.dtype | None) -> tuple[Any, Any, Any, ModelConfigs, dict]:
    """Load UNet, VAE and text encoder from a diffusers folder or Hub id."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if local and not (Path(where) / "model_index.json").is_file():
        raise UserError(f"{where}: folder has no model_index.json; expected a diffusers Stable Diffusion folder "
                        "(model_index.json with unet/, vae/, text_encoder/) or a single-file checkpoint")
    unet = _from_pretrained(UNet2DConditionModel, where, "unet", dtype, local)
    vae = _from_pretrained(AutoencoderKL, where, "vae", dtype, local)
    te = _from_pretrained(CLIPTextModel, where, "text_encoder", dtype, local)
    te_cfg = te.config.to_dict()
    v2_detected = is_v2_text_encoder(te_cfg)
    sched = _read_scheduler_config(where, local)
    pred = sched.get("prediction_type")
    v_parameterization = resolve_flags(where, v2, v2_detected, v_parameterization,
                                       None if pred is None else pred == "v_prediction")
    configs = ModelConfigs(dict(unet.config), dict(vae.config), te_cfg, v2=v2_detected,
                           v_parameterization=v_parameterization)
    return unet, vae, te, configs, sched


def _read_scheduler_config(where: str, local: bool) -> dict:
    if local:
        path = Path(where) / "scheduler" / "scheduler_config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                logger.warning("%s: unreadable scheduler config; using the default", path)
        return {}
    try:
        from diffusers import DDIMScheduler

        return dict(DDIMScheduler.load_config(where, subfolder="scheduler"))
    except Exception:  # noqa: BLE001 - only informational
        return {}


def load_vae(spec: str, configs: ModelConfigs, dtype: torch.dtype | None) -> Any:
    """Load a replacement VAE (``--vae``): a diffusers folder/Hub id, a diffusers VAE state dict,
    a full ldm checkpoint, or a VAE-only ldm file. Its architecture must match the model's VAE."""
    from diffusers import AutoencoderKL

    path = Path(spec)
    if path.is_dir():
        sub = None if (path / "config.json").is_file() else "vae"
        if sub and not (path / "vae" / "config.json").is_file():
            raise UserError(f"--vae {spec}: folder has neither config.json nor vae/config.json")
        return _from_pretrained(AutoencoderKL, spec, sub, dtype, True)
    if not path.exists():
        if _looks_like_hub_id(spec):
            try:
                return _from_pretrained(AutoencoderKL, spec, None, dtype, False)
            except UserError:
                return _from_pretrained(AutoencoderKL, spec, "vae", dtype, False)
        raise UserError(f"--vae {spec}: no such file or folder")
    sd = open_state_dict(path)
    keys = sd.keys()
    vae = _empty_module(AutoencoderKL, configs.vae, f"--vae {spec}")
    if any(k.startswith("encoder.down_blocks.") for k in keys):  # diffusers-layout state dict
        tensors: Iterable[tuple[str, torch.Tensor]] = ((k, sd[k]) for k in keys)
    else:
        if convert.ldm_vae_prefix(keys) is None:
            raise UserError(f"--vae {spec}: holds no VAE weights (neither 'first_stage_model.*' nor ldm VAE keys)")
        plan = convert.ldm_to_diffusers_plan(keys, configs)["vae"]
        tensors = convert.apply_plan(plan, sd.__getitem__)
    return fill_module(vae, tensors, source=f"--vae {spec}", component="VAE", dtype=dtype)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and \
        not Path(spec).suffix.lower() in (".ckpt", ".safetensors", ".pt", ".bin", ".pth")


def peek_is_v2(path: str | os.PathLike | None) -> bool | None:
    """Whether a model is SD2 from its header or configs alone (no weights read); None when unknown
    (a Hub id, or a path that does not exist). Lets the tokenizer match the model before it loads."""
    if not path:
        return None
    local = Path(os.path.expanduser(str(path)))
    try:
        if local.is_file():
            from library.models.detect import detect_ldm_family

            family = detect_ldm_family(open_state_dict(local).keys())
            return True if family == "sd2" else False if family == "sd1" else None
        if local.is_dir():
            te = local / "text_encoder" / "config.json"
            return is_v2_text_encoder(json.loads(te.read_text(encoding="utf-8"))) if te.is_file() else None
    except (UserError, OSError, ValueError):
        return None
    return None


def load_model(path: str | os.PathLike | None, *, v2: bool | None = None, v_parameterization: bool | None = None,
               vae: str | None = None, reference_model: str | None = None, tokenizer_cache_dir: str | None = None,
               dtype: torch.dtype | None = torch.float32) -> StableDiffusionModel:
    """Load the model named by ``--pretrained_model_name_or_path`` with its tokenizer.

    ``v2`` and ``v_parameterization`` are the user's flags (None: not stated). The SD version is always
    taken from the weights, with a warning when ``--v2`` disagrees. The prediction type follows the flag
    when given (warning when the model says otherwise), else the model's own scheduler config or
    ``modelspec`` header, else epsilon. Every problem with the input raises UserError naming the path.
    """
    from library.models.tokenizer import load_tokenizer

    if path is None or str(path) == "":
        raise UserError("--pretrained_model_name_or_path is required (an ldm .ckpt/.safetensors file, "
                        "a diffusers folder, or a Hugging Face Hub id)")
    spec = str(path)
    local = Path(os.path.expanduser(spec))
    if local.is_symlink():
        local = local.resolve()
    if local.is_file():
        unet, vae_m, te, configs, _ = load_ldm_checkpoint(local, v2=v2, v_parameterization=v_parameterization,
                                                          reference_model=reference_model, dtype=dtype)
        source_format, sched = "ldm", {}
    elif local.is_dir():
        unet, vae_m, te, configs, sched = load_diffusers_model(str(local), local=True, v2=v2,
                                                               v_parameterization=v_parameterization, dtype=dtype)
        source_format = "diffusers"
    elif _looks_like_hub_id(spec):
        unet, vae_m, te, configs, sched = load_diffusers_model(spec, local=False, v2=v2,
                                                               v_parameterization=v_parameterization, dtype=dtype)
        source_format = "diffusers"
    else:
        raise UserError(f"--pretrained_model_name_or_path {spec}: no such file or folder")
    sched = dict(scheduler_config(configs.v_parameterization),
                 **{k: v for k, v in sched.items() if not k.startswith("_")})
    sched["prediction_type"] = "v_prediction" if configs.v_parameterization else "epsilon"
    if vae:
        vae_m = load_vae(vae, configs, dtype)
        logger.info("using VAE from %s", vae)
    tokenizer = load_tokenizer(configs.v2, tokenizer_cache_dir)
    for module in (unet, vae_m, te):
        module.eval()
    return StableDiffusionModel(unet, vae_m, te, tokenizer, configs, str(local) if local.exists() else spec,
                                source_format, sched)
