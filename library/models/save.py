"""Save a Stable Diffusion model as an ldm single file (ckpt/safetensors) or a diffusers folder.

Every write goes to a temporary name and is renamed into place. Text-encoder weights are always
written with the ``text_model.`` prefix that transformers 4, diffusers, A1111 and ComfyUI expect,
whatever transformers version is installed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.fileio import atomic_path
from library.models import convert
from library.models.presets import ModelConfigs
from library.modelspec import HeaderFields

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
PRECISIONS = {None: None, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
              "bf16": torch.bfloat16}


def precision_dtype(name: str | None) -> torch.dtype | None:
    """Map ``--save_precision`` (float/fp16/bf16, or None) to a torch dtype."""
    if name not in PRECISIONS:
        raise UserError(f"--save_precision {name}: expected one of float, fp16, bf16")
    return PRECISIONS[name]


def canonical_te_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """The text encoder's weights with ``text_model.``-prefixed keys (the ecosystem's layout)."""
    return convert.te_state_dict_to_canonical(text_encoder.state_dict())


def component_state_dicts(unet, vae, text_encoder) -> dict[str, dict[str, torch.Tensor]]:
    """UNet, VAE and canonical text-encoder state dicts keyed by component name."""
    return {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": canonical_te_state_dict(text_encoder)}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.cpu().contiguous()


def build_ldm_state_dict(components: dict[str, dict[str, torch.Tensor]], configs: ModelConfigs,
                         save_dtype: torch.dtype | None, template: str | None = None) -> dict[str, torch.Tensor]:
    """Convert component weights to one ldm state dict.

    With ``template`` (the ldm file the model was loaded from), the template's other keys (EMA weights,
    ``alphas_cumprod``, SD2's unused last text layer and projection, ...) are kept with their dtype, and
    SD2 pieces that diffusers lacks are taken from it instead of being synthesised.
    """
    plan = convert.diffusers_to_ldm_plan({name: sd.keys() for name, sd in components.items()}, configs)

    def get(source: str) -> torch.Tensor:
        component, key = source.split(":", 1)
        return components[component][key]

    out: dict[str, torch.Tensor] = {}
    for key, tensor in convert.apply_plan(plan, get):
        out[key] = _cast(tensor, save_dtype)
    if template:
        from library.models.statedict import open_state_dict

        tpl = open_state_dict(template)
        _, kept = convert.ldm_component_keys(tpl.keys(), configs)
        for key in kept:
            out[key] = tpl[key].contiguous()
    return out


def save_ldm_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, epoch: int = 0,
                        global_step: int = 0, metadata: dict[str, str] | None = None,
                        template_extra: dict | None = None) -> None:
    """Write an ldm state dict as ``.safetensors`` (by extension) or a torch ``.ckpt`` pickle, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(state_dict, str(tmp), metadata=metadata or {})
        else:
            extra = template_extra or {}
            torch.save({"state_dict": state_dict, "epoch": int(extra.get("epoch", 0) or 0) + epoch,
                        "global_step": int(extra.get("global_step", 0) or 0) + global_step}, tmp)


def _write_weights(folder: Path, stem: str, state: dict[str, torch.Tensor], safetensors: bool,
                   dtype: torch.dtype | None) -> None:
    state = {k: _cast(v, dtype) for k, v in state.items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / f"{stem}.bin")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_diffusers_folder(path: str | os.PathLike, components: dict[str, dict[str, torch.Tensor]],
                          configs: ModelConfigs, scheduler: dict, tokenizer: Any, *, safetensors: bool,
                          save_dtype: torch.dtype | None) -> None:
    """Write a ``StableDiffusionPipeline`` folder (model_index.json, unet/, vae/, text_encoder/,
    scheduler/, tokenizer/) atomically, with ``text_model.``-prefixed text-encoder keys, and the manifest
    (:data:`library.output_safety.MANIFEST`) that lets a later save replace it; an existing folder of that
    name is replaced only when it is such a save, unchanged since."""
    import diffusers

    from library.models.tokenizer import save_tokenizer

    from library.output_safety import write_manifest

    with atomic_path(path, replace_kind="diffusers") as tmp:
        for sub in ("unet", "vae", "text_encoder", "scheduler"):
            (tmp / sub).mkdir(parents=True)
        ver = diffusers.__version__
        _write_json(tmp / "unet" / "config.json",
                    dict(_public(configs.unet), _class_name="UNet2DConditionModel", _diffusers_version=ver))
        _write_weights(tmp / "unet", "diffusion_pytorch_model", components["unet"], safetensors, save_dtype)
        _write_json(tmp / "vae" / "config.json", dict(_public(configs.vae), _class_name="AutoencoderKL",
                                                      _diffusers_version=ver))
        _write_weights(tmp / "vae", "diffusion_pytorch_model", components["vae"], safetensors, save_dtype)
        te_cfg = dict(_public(configs.text_encoder), architectures=["CLIPTextModel"], model_type="clip_text_model")
        if save_dtype is not None:
            te_cfg["torch_dtype"] = str(save_dtype).replace("torch.", "")
        _write_json(tmp / "text_encoder" / "config.json", te_cfg)
        _write_weights(tmp / "text_encoder", "model" if safetensors else "pytorch_model",
                       components["text_encoder"], safetensors, save_dtype)
        _write_json(tmp / "scheduler" / "scheduler_config.json",
                    dict(_public(scheduler), _class_name="DDIMScheduler", _diffusers_version=ver))
        save_tokenizer(tokenizer, tmp / "tokenizer")
        _write_json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": ver,
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]})
        write_manifest(tmp, "diffusers")  # what proves the folder ours when a later save replaces it


def _public(config: dict) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def save_model(model, path: str | os.PathLike, save_format: str, *, save_dtype: torch.dtype | None = None,
               epoch: int = 0, global_step: int = 0, use_template: bool = True,
               header: HeaderFields | None = None) -> Path:
    """Save a :class:`~library.models.load.StableDiffusionModel` in ``save_format``.

    ckpt/safetensors write an ldm single file (with the source ldm file as template when the model came
    from one); diffusers/diffusers_safetensors write a folder. A ``.safetensors`` file gets the whole-model
    ``modelspec.*`` header (:mod:`library.modelspec`) for the model's version and prediction type, with the
    run's ``header`` fields (default: titled with the file's stem). Returns the written path.
    """
    if save_format not in SAVE_FORMATS:
        raise UserError(f"--save_model_as {save_format}: expected one of {', '.join(SAVE_FORMATS)}")
    path = Path(path)
    components = component_state_dicts(model.unet, model.vae, model.text_encoder)
    if save_format in ("ckpt", "safetensors"):
        template = model.source if (use_template and model.source_format == "ldm") else None
        state = build_ldm_state_dict(components, model.configs, save_dtype, template)
        extra = None
        if template and save_format == "ckpt":
            from library.models.statedict import open_state_dict

            extra = open_state_dict(template).extra
        meta = None
        if save_format == "safetensors":
            fields = header if header is not None else HeaderFields(title=path.stem)
            meta = fields.header(v2=model.configs.v2, v_parameterization=model.configs.v_parameterization,
                                 adapter=None)
        save_ldm_checkpoint(path, state, epoch=epoch, global_step=global_step, metadata=meta,
                            template_extra=extra)
        logger.info("saved %d tensors to %s", len(state), path)
    else:
        save_diffusers_folder(path, components, model.configs, model.scheduler_config, model.tokenizer,
                              safetensors=(save_format == "diffusers_safetensors"), save_dtype=save_dtype)
        logger.info("saved diffusers model to %s", path)
    return path
