"""Build Stable Diffusion models with random weights from a preset and a seed (tests, demo, benches)."""

from __future__ import annotations

import torch

from library.models.presets import ModelConfigs, get_preset, scheduler_config


def _init_module(cls, config: dict, generator: torch.Generator, fast: bool):
    from accelerate import init_empty_weights

    if fast:
        # Full-size architectures: skip PyTorch's per-layer init (slow) and fill N(0, 0.02) directly.
        with init_empty_weights(include_buffers=False):
            module = _construct(cls, config)
        state = {}
        for name, param in module.named_parameters():
            t = torch.empty(param.shape, dtype=torch.float32)
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "layer_norm1.weight",
                              "layer_norm2.weight", "final_layer_norm.weight", "norm_out.weight", "conv_norm_out.weight",
                              "group_norm.weight")):
                t.fill_(1.0)
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=generator)
            state[name] = t
        module.load_state_dict(state, strict=False, assign=True)
        return module
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    return _construct(cls, config)


def _construct(cls, config: dict):
    if cls.__name__ == "CLIPTextModel":
        from transformers import CLIPTextConfig

        return cls(CLIPTextConfig(**config))
    return cls.from_config(config)


def build_random_model(preset: str | ModelConfigs, seed: int = 0, tokenizer_cache_dir: str | None = None):
    """A :class:`~library.models.load.StableDiffusionModel` with seeded random weights.

    Tiny presets use the libraries' own initialisation (so training behaves like a real init); the
    full-size ``sd1``/``sd2`` presets are filled with N(0, 0.02) for speed.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from library.models.load import StableDiffusionModel
    from library.models.tokenizer import load_tokenizer

    configs = get_preset(preset) if isinstance(preset, str) else preset
    fast = configs.unet["block_out_channels"][0] >= 320
    gen = torch.Generator().manual_seed(seed)
    unet = _init_module(UNet2DConditionModel, configs.unet, gen, fast)
    vae = _init_module(AutoencoderKL, configs.vae, gen, fast)
    te = _init_module(CLIPTextModel, configs.text_encoder, gen, fast)
    for m in (unet, vae, te):
        m.eval()
    tokenizer = load_tokenizer(configs.v2, tokenizer_cache_dir)
    return StableDiffusionModel(unet, vae, te, tokenizer, configs, source=f"random:{preset if isinstance(preset, str) else 'custom'}:{seed}",
                                source_format="random", scheduler_config=scheduler_config(configs.v_parameterization))
