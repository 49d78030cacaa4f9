"""Recognise what an ldm single-file checkpoint holds, and infer its component configs from shapes.

Everything here works on key names and shapes only (a safetensors header is enough); no tensor is read.

Head-count rules (weights do not record them): SD1 family → 8 heads at every UNet level; SD2 family
→ ``max(1, channels // 64)`` heads per level (64-dim heads); text encoder → ``max(1, hidden // 64)``.
The tiny/mini presets in :mod:`library.models.presets` follow the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from library.models.convert import SD1_TE_PREFIX, SD2_TE_PREFIX, UNET_PREFIX, ldm_vae_prefix
from library.models.presets import ModelConfigs, get_preset

Shapes = Mapping[str, tuple[int, ...]]

_LORA_MARKERS = ("lora_down", "lora_up", "lora_A.", "lora_B.", ".lora.", "hada_w", "lokr_w")


def detect_ldm_family(keys: Iterable[str] | Shapes) -> str:
    """Classify a single-file checkpoint by its keys.

    Returns ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"lora"`` (a network file such as kohya's
    ``lora_unet_…`` keys), ``"vae_only"`` (ldm VAE keys only, with ``first_stage_model.`` or bare) or
    ``"not_sd"``. When a mapping key → shape is passed and the file has a UNet but no text encoder, a
    1024-wide cross-attention context marks it SD2.
    """
    shapes: Shapes | None = keys if isinstance(keys, Mapping) else None
    names = list(keys)
    if any(k.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb.")) for k in names):
        return "sdxl"
    if any(k.startswith(UNET_PREFIX) for k in names):
        if any(k.startswith(SD2_TE_PREFIX + "transformer.resblocks.") for k in names):
            return "sd2"
        if not any(k.startswith(SD1_TE_PREFIX) for k in names) and shapes is not None:
            width = _cross_attention_dim(shapes)
            if width == 1024:
                return "sd2"
        return "sd1"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in names) or \
            any(marker in k for k in names for marker in _LORA_MARKERS):
        return "lora"
    prefix = ldm_vae_prefix(names)
    if prefix is not None and not any(k.startswith("cond_stage_model.") for k in names):
        return "vae_only"
    return "not_sd"


def _cross_attention_dim(shapes: Shapes) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight"):
            return int(shape[1])
    return None


def _indices(shapes: Shapes, pattern: str) -> set[int]:
    regex = re.compile(pattern)
    found = set()
    for key in shapes:
        match = regex.match(key)
        if match:
            found.add(int(match.group(1)))
    return found


def _infer_unet(shapes: Shapes, base: dict, v2: bool) -> dict:
    p = re.escape(UNET_PREFIX)
    inputs = _indices(shapes, p + r"input_blocks\.(\d+)\.")
    downs = sorted(_indices(shapes, p + r"input_blocks\.(\d+)\.0\.op\.weight$"))
    if not inputs:
        raise ValueError("no UNet input_blocks keys: cannot infer the UNet config")
    total = max(inputs) + 1
    if downs:
        layers, levels = downs[0] - 1, len(downs) + 1
    else:
        layers, levels = total - 1, 1
    if layers < 1 or total != 1 + levels * layers + (levels - 1):
        raise ValueError(f"UNet input_blocks layout not recognised ({total} blocks, downsamplers at {downs})")
    cfg = dict(base)
    channels, down_types, up_types = [], [], []
    for i in range(levels):
        idx = 1 + i * (layers + 1)
        channels.append(int(shapes[f"{UNET_PREFIX}input_blocks.{idx}.0.out_layers.3.weight"][0]))
        down_attn = f"{UNET_PREFIX}input_blocks.{idx}.1.proj_in.weight" in shapes
        down_types.append("CrossAttnDownBlock2D" if down_attn else "DownBlock2D")
        up_attn = f"{UNET_PREFIX}output_blocks.{i * (layers + 1)}.1.proj_in.weight" in shapes
        up_types.append("CrossAttnUpBlock2D" if up_attn else "UpBlock2D")
    cfg.update(block_out_channels=channels, layers_per_block=layers, down_block_types=down_types,
               up_block_types=up_types,
               in_channels=int(shapes[UNET_PREFIX + "input_blocks.0.0.weight"][1]),
               out_channels=int(shapes[UNET_PREFIX + "out.2.weight"][0]))
    context = _cross_attention_dim(shapes)
    if context is not None:
        cfg["cross_attention_dim"] = context
    proj = [shape for key, shape in shapes.items() if key.startswith(UNET_PREFIX) and key.endswith(".proj_in.weight")]
    if proj:
        cfg["use_linear_projection"] = len(proj[0]) == 2
    cfg["attention_head_dim"] = [max(1, c // 64) for c in channels] if v2 else 8
    return cfg


def _infer_vae(shapes: Shapes, base: dict, prefix: str) -> dict:
    p = re.escape(prefix)
    levels = len(_indices(shapes, p + r"encoder\.down\.(\d+)\."))
    layers = len(_indices(shapes, p + r"encoder\.down\.0\.block\.(\d+)\."))
    if levels == 0 or layers == 0:
        raise ValueError("no VAE encoder.down keys: cannot infer the VAE config")
    cfg = dict(base)
    cfg.update(block_out_channels=[int(shapes[f"{prefix}encoder.down.{i}.block.0.conv1.weight"][0])
                                   for i in range(levels)],
               layers_per_block=layers,
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
               in_channels=int(shapes[prefix + "encoder.conv_in.weight"][1]),
               out_channels=int(shapes[prefix + "decoder.conv_out.weight"][0]),
               latent_channels=int(shapes[prefix + "decoder.conv_in.weight"][1]))
    return cfg


def _infer_te(shapes: Shapes, base: dict, v2: bool) -> dict:
    cfg = dict(base)
    if v2:
        p = SD2_TE_PREFIX
        vocab, hidden = shapes[p + "token_embedding.weight"]
        positions = shapes[p + "positional_embedding"][0]
        intermediate = shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        layers = len(_indices(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")) - 1
        act = "gelu"
    else:
        p = SD1_TE_PREFIX + "text_model."
        if p + "embeddings.token_embedding.weight" not in shapes:
            p = SD1_TE_PREFIX  # variant without the text_model. level
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        intermediate = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
        layers = len(_indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\."))
        act = "quick_gelu"
    cfg.update(vocab_size=int(vocab), hidden_size=int(hidden), intermediate_size=int(intermediate),
               num_hidden_layers=int(layers), num_attention_heads=max(1, int(hidden) // 64),
               max_position_embeddings=int(positions), hidden_act=act)
    return cfg


def infer_configs_from_ldm(shapes: Shapes) -> ModelConfigs:
    """Component configs of an SD1/SD2 ldm checkpoint (or VAE-only file) from its weight shapes alone.

    Starts from the real ``sd1``/``sd2`` preset and overrides every structural value readable from the
    shapes; components absent from the file keep the preset's config. ``sample_size`` and
    ``v_parameterization`` (not visible in weights) stay the preset's (epsilon).
    """
    family = detect_ldm_family(shapes)
    if family not in ("sd1", "sd2", "vae_only"):
        raise ValueError(f"not an SD1/SD2 ldm checkpoint (detected {family!r})")
    v2 = family == "sd2"
    base = get_preset("sd2" if v2 else "sd1")
    unet = _infer_unet(shapes, base.unet, v2) if family != "vae_only" else base.unet
    vae_prefix = ldm_vae_prefix(shapes)
    vae = _infer_vae(shapes, base.vae, vae_prefix) if vae_prefix is not None else base.vae
    has_te = any(k.startswith(SD2_TE_PREFIX if v2 else SD1_TE_PREFIX) for k in shapes)
    te = _infer_te(shapes, base.text_encoder, v2) if has_te else base.text_encoder
    _check_group_norms("UNet", unet)
    _check_group_norms("VAE", vae)
    return ModelConfigs(unet, vae, te, v2=v2, v_parameterization=False)


def _check_group_norms(component: str, config: dict) -> None:
    """ValueError when the inferred block widths cannot take the standard group count.

    The number of normalisation groups is not stored in the weights (only one scale per channel), so it
    is assumed to be SD's 32; narrower or odd widths mean a non-standard model whose configs must come
    from elsewhere.
    """
    groups = int(config.get("norm_num_groups", 32))
    odd = [c for c in config["block_out_channels"] if c % groups]
    if odd:
        raise ValueError(f"its {component} has blocks {odd[0]} channels wide, which SD's {groups} normalisation "
                         "groups do not divide: a non-standard architecture the file does not describe")
