"""Component configurations (diffusers UNet/VAE configs, transformers CLIP text config) by name.

``sd1`` and ``sd2`` are the real SD1.5 and SD2.x architectures, read from the JSON files shipped in
``library/models/configs/`` so that loading a single-file checkpoint needs no network. ``tiny-sd1``,
``tiny-sd2`` and ``mini-sd1`` are small random-weight stand-ins with the same structure, used by tests
and the demo. Their head counts follow the rules that :mod:`library.models.detect` uses to infer a
config from weight shapes, so an ldm file of a tiny model loads without a reference folder.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class ModelConfigs:
    """The three component configs of one Stable Diffusion model, plus its family flags."""

    unet: dict
    vae: dict
    text_encoder: dict
    v2: bool
    v_parameterization: bool = False

    def copy(self) -> "ModelConfigs":
        """A deep copy, so callers may edit the dicts."""
        return ModelConfigs(copy.deepcopy(self.unet), copy.deepcopy(self.vae), copy.deepcopy(self.text_encoder),
                            self.v2, self.v_parameterization)


@lru_cache(maxsize=None)
def _read(family: str, component: str) -> dict:
    with open(CONFIG_DIR / family / f"{component}.json", encoding="utf-8") as f:
        return json.load(f)


def scheduler_config(v_parameterization: bool) -> dict:
    """The DDIM scheduler config used for SD1/SD2 (scaled-linear betas, 1000 steps)."""
    cfg = dict(_read("sd1", "scheduler"))
    cfg["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    return cfg


def _tiny(v2: bool, layers_per_block: int, levels: int) -> ModelConfigs:
    channels = [32, 64, 64, 64][:levels]
    down = ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)
    hidden = 32
    unet = dict(_read("sd1", "unet"), block_out_channels=channels, down_block_types=down, up_block_types=up,
                layers_per_block=layers_per_block, cross_attention_dim=hidden, sample_size=8)
    if v2:
        # SD2 rule: 64-dim heads, at least one head per level.
        unet.update(attention_head_dim=[max(1, c // 64) for c in channels], use_linear_projection=True)
    vae = dict(_read("sd1", "vae"), block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
    te = dict(_read("sd2" if v2 else "sd1", "text_encoder"), hidden_size=hidden, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=max(1, hidden // 64), projection_dim=hidden)
    return ModelConfigs(unet, vae, te, v2=v2, v_parameterization=v2)


def get_preset(name: str) -> ModelConfigs:
    """Return the configs for a named architecture: sd1, sd2, sd2-v, tiny-sd1, tiny-sd2 (v-pred), mini-sd1."""
    if name == "sd1":
        return ModelConfigs(_read("sd1", "unet"), _read("sd1", "vae"), _read("sd1", "text_encoder"), v2=False).copy()
    if name in ("sd2", "sd2-v"):
        unet = dict(_read("sd2", "unet"))
        if name == "sd2-v":
            unet["sample_size"] = 96
        return ModelConfigs(unet, _read("sd2", "vae"), _read("sd2", "text_encoder"), v2=True,
                            v_parameterization=(name == "sd2-v")).copy()
    if name == "tiny-sd1":
        return _tiny(v2=False, layers_per_block=1, levels=2)
    if name in ("tiny-sd2", "tiny-sd2-v"):
        return _tiny(v2=True, layers_per_block=1, levels=2)
    if name == "mini-sd1":
        # Four levels and two layers per block like the real UNet: exercises every ldm index rule.
        return _tiny(v2=False, layers_per_block=2, levels=4)
    if name == "mini-sd2":
        return _tiny(v2=True, layers_per_block=2, levels=4)
    raise KeyError(name)


PRESET_NAMES = ("sd1", "sd2", "sd2-v", "tiny-sd1", "tiny-sd2", "mini-sd1", "mini-sd2")
