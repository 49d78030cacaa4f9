"""Key conversion between the original Stable Diffusion single-file (ldm) layout and Diffusers.

Conversions are expressed as *plans*: ``{target_key: Recipe(sources, transform)}``. A plan is built
from key names and the component configs only, so a 4 GB checkpoint can be converted one tensor at a
time with :func:`apply_plan` and a lazy getter (e.g. a memory-mapped safetensors file).

Key naming
----------
* ldm side: the full keys of the single file (``model.diffusion_model.…`` for the UNet,
  ``first_stage_model.…`` for the VAE, ``cond_stage_model.transformer.…`` (SD1, HF CLIP layout) or
  ``cond_stage_model.model.…`` (SD2, OpenCLIP layout) for the text encoder).
* Diffusers side: the ``state_dict()`` keys of ``UNet2DConditionModel`` / ``AutoencoderKL``, and for
  the text encoder the *canonical* layout with the ``text_model.`` level
  (``text_model.embeddings.token_embedding.weight``), whatever the installed transformers version
  names it. :func:`te_state_dict_to_canonical` / :func:`te_canonical_to_module_keys` translate.
* Sources of :func:`diffusers_to_ldm_plan` are named ``"<component>:<key>"`` with component one of
  ``unet``, ``vae``, ``text_encoder`` (see :func:`source_name` / :func:`split_source`).

Dropped and synthesised keys
----------------------------
* ldm → Diffusers ignores (leaves out of the plan, reported as unused by :func:`ldm_component_keys`):
  anything outside the three component prefixes (EMA, ``alphas_cumprod``, …), text-encoder
  ``position_ids`` buffers, and for SD2 the OpenCLIP resblocks at index ≥ ``num_hidden_layers``,
  ``text_projection`` and ``logit_scale``.
* Diffusers → ldm for SD2 synthesises what OpenCLIP has and Diffusers lacks: one extra resblock that
  is a copy of the last real layer, ``text_projection`` = ones [hidden, hidden] (dtype of the text
  encoder weights) and ``logit_scale`` = ``torch.tensor(1)`` (an int64 scalar, as upstream kohya does).
  A file written this way converts back and forth bit-exactly and key-for-key.
* SD1 files whose text-encoder keys lack ``text_model.`` are read; they are written back with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from library.models.presets import ModelConfigs

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
TE_CANONICAL_PREFIX = "text_model."
COMPONENTS = ("unet", "vae", "text_encoder")


class Recipe(NamedTuple):
    """How to make one target tensor: ``transform([get(s) for s in sources])``."""

    sources: tuple[str, ...]
    transform: Callable[[list[Tensor]], Tensor]


Plan = dict[str, Recipe]


# --------------------------------------------------------------------------------------------------
# transforms (module-level so plans have readable reprs)


def identity(ts: list[Tensor]) -> Tensor:
    """The single source tensor, unchanged (no copy)."""
    return ts[0]


def clone(ts: list[Tensor]) -> Tensor:
    """A copy of the single source tensor (for synthesised duplicates, so no two outputs share storage)."""
    return ts[0].clone()


def conv1x1_to_linear(ts: list[Tensor]) -> Tensor:
    """[C_out, C_in, 1, 1] (ldm 1×1 conv) → [C_out, C_in] (Diffusers Linear); 2-D input passes through."""
    t = ts[0]
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


def linear_to_conv1x1(ts: list[Tensor]) -> Tensor:
    """[C_out, C_in] (Diffusers Linear) → [C_out, C_in, 1, 1] (ldm 1×1 conv); 4-D input passes through."""
    t = ts[0]
    return t.reshape(t.shape[0], t.shape[1], 1, 1) if t.ndim == 2 else t


def chunk3(index: int, ts: list[Tensor]) -> Tensor:
    """Part ``index`` (0 = q, 1 = k, 2 = v) of a fused in_proj tensor split in 3 along dim 0 (a copy)."""
    return ts[0].chunk(3, dim=0)[index].clone()


def concat(ts: list[Tensor]) -> Tensor:
    """Concatenate the sources along dim 0 (q, k, v → in_proj)."""
    return torch.cat(ts, dim=0)


def ones_square(size: int, ts: list[Tensor]) -> Tensor:
    """A [size, size] tensor of ones with the dtype/device of the first source (SD2 ``text_projection``)."""
    return torch.ones(size, size, dtype=ts[0].dtype, device=ts[0].device)


def int_one(ts: list[Tensor]) -> Tensor:
    """The scalar ``torch.tensor(1)`` (int64), written as SD2 ``logit_scale`` like upstream kohya."""
    return torch.tensor(1)


# --------------------------------------------------------------------------------------------------
# text-encoder key helpers


def te_state_dict_to_canonical(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return ``sd`` with the ``text_model.`` prefix added to every key that lacks it."""
    return {_te_canonical_key(k): v for k, v in sd.items()}


def te_canonical_to_module_keys(sd: Mapping[str, Tensor], module: torch.nn.Module) -> dict[str, Tensor]:
    """Rename canonical (``text_model.``-prefixed) keys to the layout of ``module.state_dict()``.

    transformers 5 names CLIPTextModel weights without ``text_model.``, transformers 4 with it. A
    ``position_ids`` buffer that the module keeps in its state dict but ``sd`` lacks is filled from the
    module's own buffer, so ``load_state_dict(strict=True)`` works under either version.
    """
    own = module.state_dict()
    prefixed = any(k.startswith(TE_CANONICAL_PREFIX) for k in own)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        key = _te_canonical_key(key)
        out[key if prefixed else key[len(TE_CANONICAL_PREFIX):]] = value
    for key in own:
        if key.endswith("position_ids") and key not in out:
            out[key] = own[key].clone()
    return out


def _te_canonical_key(key: str) -> str:
    return key if key.startswith(TE_CANONICAL_PREFIX) else TE_CANONICAL_PREFIX + key


def source_name(component: str, key: str) -> str:
    """The source name used by :func:`diffusers_to_ldm_plan`: ``"<component>:<key>"``."""
    return f"{component}:{key}"


def split_source(name: str) -> tuple[str, str]:
    """Inverse of :func:`source_name`: ``"vae:encoder.conv_in.weight"`` → ``("vae", "encoder.conv_in.weight")``."""
    component, _, key = name.partition(":")
    if component not in COMPONENTS or not key:
        raise ValueError(f"not a component source name: {name!r}")
    return component, key


# --------------------------------------------------------------------------------------------------
# UNet / VAE module tables


@dataclass(frozen=True)
class _Block:
    """One module in both layouts: its ldm and Diffusers prefixes and how the names inside it map."""

    ldm: str
    diff: str
    sub: Mapping[str, str] | None = None  # ldm sub-module name → Diffusers name; None = identical names
    reshape: frozenset[str] = frozenset()  # ldm sub-modules whose weight is a 1×1 conv vs a Linear


_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _int_layers(cfg: dict) -> int:
    layers = cfg["layers_per_block"]
    if not isinstance(layers, int):
        raise TypeError(f"per-level layers_per_block is not supported: {layers!r}")
    return layers


def _unet_blocks(cfg: dict) -> list[_Block]:
    """Every UNet module in both layouts, computed from the config (levels, layers per block, attention)."""
    levels = len(cfg["block_out_channels"])
    layers = _int_layers(cfg)
    mid_type = cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unsupported mid_block_type {mid_type!r}")
    blocks = [_Block("time_embed.0", "time_embedding.linear_1"), _Block("time_embed.2", "time_embedding.linear_2"),
              _Block("input_blocks.0.0", "conv_in"), _Block("out.0", "conv_norm_out"), _Block("out.2", "conv_out")]
    for i, block_type in enumerate(cfg["down_block_types"]):
        attn = "CrossAttn" in block_type
        for j in range(layers):
            idx = 1 + i * (layers + 1) + j
            blocks.append(_Block(f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if attn:
                blocks.append(_Block(f"input_blocks.{idx}.1", f"down_blocks.{i}.attentions.{j}"))
        if i < levels - 1:
            idx = 1 + i * (layers + 1) + layers
            blocks.append(_Block(f"input_blocks.{idx}.0", f"down_blocks.{i}.downsamplers.0", {"op": "conv"}))
    blocks += [_Block("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
               _Block("middle_block.1", "mid_block.attentions.0"),
               _Block("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)]
    for i, block_type in enumerate(cfg["up_block_types"]):
        attn = "CrossAttn" in block_type
        for j in range(layers + 1):
            idx = i * (layers + 1) + j
            blocks.append(_Block(f"output_blocks.{idx}.0", f"up_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if attn:
                blocks.append(_Block(f"output_blocks.{idx}.1", f"up_blocks.{i}.attentions.{j}"))
        if i < levels - 1:
            idx = i * (layers + 1) + layers
            blocks.append(_Block(f"output_blocks.{idx}.{2 if attn else 1}", f"up_blocks.{i}.upsamplers.0",
                                 {"conv": "conv"}))
    return blocks


def _vae_blocks(cfg: dict) -> list[_Block]:
    """Every VAE module in both layouts; decoder levels are numbered in reverse in Diffusers."""
    levels = len(cfg["block_out_channels"])
    layers = _int_layers(cfg)
    attn_reshape = frozenset({"q", "k", "v", "proj_out"})
    blocks = [_Block("quant_conv", "quant_conv"), _Block("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        blocks += [_Block(f"{part}.conv_in", f"{part}.conv_in"), _Block(f"{part}.conv_out", f"{part}.conv_out"),
                   _Block(f"{part}.norm_out", f"{part}.conv_norm_out"),
                   _Block(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
                   _Block(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET),
                   _Block(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN, attn_reshape)]
    for i in range(levels):
        for j in range(layers):
            blocks.append(_Block(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET))
        if i < levels - 1:
            blocks.append(_Block(f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0",
                                 {"conv": "conv"}))
    for i in range(levels):
        d = levels - 1 - i
        for j in range(layers + 1):
            blocks.append(_Block(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{d}.resnets.{j}", _VAE_RESNET))
        if i > 0:
            blocks.append(_Block(f"decoder.up.{i}.upsample", f"decoder.up_blocks.{d}.upsamplers.0", {"conv": "conv"}))
    return blocks


def _map_in_block(key: str, table: dict[str, tuple[_Block, bool]]) -> tuple[str, Callable] | None:
    """Map one key (without component prefix) through a prefix table; None when it is not covered.

    ``table`` maps a module prefix of the *source* layout to (block, to_diffusers).
    """
    parts = key.split(".")
    for n in range(min(5, len(parts) - 1), 0, -1):
        entry = table.get(".".join(parts[:n]))
        if entry is None:
            continue
        block, to_diff = entry
        rest = parts[n:]
        target_prefix = block.diff if to_diff else block.ldm
        if block.sub is None:
            return f"{target_prefix}.{'.'.join(rest)}", identity
        sub = block.sub if to_diff else {v: k for k, v in block.sub.items()}
        for m in (2, 1):
            name = ".".join(rest[:m])
            if len(rest) > m and name in sub:
                ldm_name = name if to_diff else sub[name]
                transform: Callable = identity
                if ldm_name in block.reshape and rest[-1] == "weight":
                    transform = conv1x1_to_linear if to_diff else linear_to_conv1x1
                return f"{target_prefix}.{sub[name]}.{'.'.join(rest[m:])}", transform
        return None
    return None


def _table(blocks: list[_Block], to_diffusers: bool) -> dict[str, tuple[_Block, bool]]:
    return {(b.ldm if to_diffusers else b.diff): (b, to_diffusers) for b in blocks}


# --------------------------------------------------------------------------------------------------
# SD2 OpenCLIP text encoder

_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
_OPENCLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                 "positional_embedding": "text_model.embeddings.position_embedding.weight",
                 "ln_final.weight": "text_model.final_layer_norm.weight",
                 "ln_final.bias": "text_model.final_layer_norm.bias"}
_OPENCLIP_SYNTH = ("text_projection", "logit_scale")
_RESBLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)$")


def _openclip_to_hf(rest: str, num_layers: int) -> list[tuple[str, Callable]] | None:
    """Targets for one OpenCLIP key (without prefix); [] when deliberately dropped, None when unknown."""
    if rest in _OPENCLIP_TOP:
        return [(_OPENCLIP_TOP[rest], identity)]
    if rest in _OPENCLIP_SYNTH:
        return []
    match = _RESBLOCK_RE.match(rest)
    if match is None:
        return None
    index, tail = int(match.group(1)), match.group(2)
    if index >= num_layers:
        return []
    base = f"text_model.encoder.layers.{index}."
    if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
        param = "weight" if tail.endswith("weight") else "bias"
        return [(f"{base}self_attn.{p}_proj.{param}", partial(chunk3, i)) for i, p in enumerate("qkv")]
    module, _, param = tail.rpartition(".")
    if module in _OPENCLIP_LAYER:
        return [(f"{base}{_OPENCLIP_LAYER[module]}.{param}", identity)]
    return None


# --------------------------------------------------------------------------------------------------
# plans


def ldm_vae_prefix(keys: Iterable[str]) -> str | None:
    """The prefix of the VAE keys in an ldm file: ``first_stage_model.``, ``""`` (VAE-only file), or None."""
    keys = list(keys)
    if any(k.startswith(VAE_PREFIX) for k in keys):
        return VAE_PREFIX
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")) for k in keys):
        return ""
    return None


def _is_position_ids(key: str) -> bool:
    return key.endswith("position_ids")


def ldm_to_diffusers_plan(ldm_keys: Iterable[str], configs: ModelConfigs, *,
                          strict: bool = False) -> dict[str, Plan]:
    """Plans ldm → Diffusers per component (``unet``, ``vae``, ``text_encoder``; TE keys canonical).

    Keys outside the components, text-encoder ``position_ids`` and the SD2 OpenCLIP extras are left
    out. With ``strict``, a key under a component prefix that no rule covers raises ``ValueError``
    (otherwise it is silently left out and shows up as unused in :func:`ldm_component_keys`).
    """
    keys = list(ldm_keys)
    plans: dict[str, Plan] = {c: {} for c in COMPONENTS}
    unknown: list[str] = []
    unet_table = _table(_unet_blocks(configs.unet), True)
    vae_table = _table(_vae_blocks(configs.vae), True)
    vae_prefix = ldm_vae_prefix(keys) if not any(k.startswith(UNET_PREFIX) for k in keys) else VAE_PREFIX
    num_layers = int(configs.text_encoder["num_hidden_layers"])

    def add(component: str, target: str, recipe: Recipe) -> None:
        if target in plans[component]:
            raise ValueError(f"two ldm keys map to {component} key {target!r}: "
                             f"{plans[component][target].sources[0]!r} and {recipe.sources[0]!r}")
        plans[component][target] = recipe

    sd1_unprefixed: list[str] = []
    for key in keys:
        if key.startswith(UNET_PREFIX):
            mapped = _map_in_block(key[len(UNET_PREFIX):], unet_table)
            if mapped is None:
                unknown.append(key)
            else:
                add("unet", mapped[0], Recipe((key,), mapped[1]))
        elif vae_prefix is not None and key.startswith(vae_prefix) and (vae_prefix or _looks_like_vae(key)):
            mapped = _map_in_block(key[len(vae_prefix):], vae_table)
            if mapped is None:
                unknown.append(key)
            else:
                add("vae", mapped[0], Recipe((key,), mapped[1]))
        elif key.startswith(SD1_TE_PREFIX) and not configs.v2:
            rest = key[len(SD1_TE_PREFIX):]
            if _is_position_ids(rest):
                continue
            if not rest.startswith(TE_CANONICAL_PREFIX):
                sd1_unprefixed.append(key)  # added after the prefixed ones, which win
                continue
            add("text_encoder", rest, Recipe((key,), identity))
        elif key.startswith(SD2_TE_PREFIX) and configs.v2:
            rest = key[len(SD2_TE_PREFIX):]
            if _is_position_ids(rest):  # e.g. the WD 1.4 variant's stray position ids
                continue
            targets = _openclip_to_hf(rest, num_layers)
            if targets is None:
                unknown.append(key)
                continue
            for target, transform in targets:
                add("text_encoder", target, Recipe((key,), transform))
        elif key.startswith("cond_stage_model."):
            unknown.append(key)
    for key in sd1_unprefixed:
        target = TE_CANONICAL_PREFIX + key[len(SD1_TE_PREFIX):]
        if target not in plans["text_encoder"]:
            plans["text_encoder"][target] = Recipe((key,), identity)
    if strict and unknown:
        raise ValueError(f"{len(unknown)} ldm keys not covered by the conversion, e.g. {unknown[:5]}")
    return plans


def _looks_like_vae(key: str) -> bool:
    return key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))


def ldm_component_keys(ldm_keys: Iterable[str], configs: ModelConfigs) -> tuple[list[str], list[str]]:
    """Split ldm keys into (used by :func:`ldm_to_diffusers_plan`, not used), both in input order.

    The unused ones are what a template-based save should keep as they are (EMA weights,
    ``alphas_cumprod``, ``position_ids``, SD2's extra resblock / ``text_projection`` / ``logit_scale``).
    """
    keys = list(ldm_keys)
    plans = ldm_to_diffusers_plan(keys, configs)
    used_set = {s for plan in plans.values() for recipe in plan.values() for s in recipe.sources}
    return [k for k in keys if k in used_set], [k for k in keys if k not in used_set]


def diffusers_to_ldm_plan(component_keys: Mapping[str, Iterable[str]], configs: ModelConfigs, *,
                          strict: bool = False) -> Plan:
    """Plan Diffusers → ldm. ``component_keys`` maps ``unet``/``vae``/``text_encoder`` to state-dict keys.

    Sources are named ``"<component>:<key>"`` (:func:`source_name`). Text-encoder keys may be canonical
    or unprefixed (transformers 5); ``position_ids`` keys are dropped. Components that are absent are
    skipped. For SD2 the OpenCLIP extras are synthesised (see the module docstring). With ``strict``,
    keys no rule covers raise ``ValueError``; otherwise they are left out.
    """
    plan: Plan = {}
    unknown: list[str] = []
    if "unet" in component_keys:
        table = _table(_unet_blocks(configs.unet), False)
        for key in component_keys["unet"]:
            mapped = _map_in_block(key, table)
            if mapped is None:
                unknown.append(source_name("unet", key))
            else:
                plan[UNET_PREFIX + mapped[0]] = Recipe((source_name("unet", key),), mapped[1])
    if "vae" in component_keys:
        table = _table(_vae_blocks(configs.vae), False)
        for key in component_keys["vae"]:
            mapped = _map_in_block(key, table)
            if mapped is None:
                unknown.append(source_name("vae", key))
            else:
                plan[VAE_PREFIX + mapped[0]] = Recipe((source_name("vae", key),), mapped[1])
    if "text_encoder" in component_keys:
        te_keys = {_te_canonical_key(k): k for k in component_keys["text_encoder"] if not _is_position_ids(k)}
        if configs.v2:
            unknown += _sd2_te_to_ldm(te_keys, plan)
        else:
            for canonical, key in te_keys.items():
                plan[SD1_TE_PREFIX + canonical] = Recipe((source_name("text_encoder", key),), identity)
    if strict and unknown:
        raise ValueError(f"{len(unknown)} Diffusers keys not covered by the conversion, e.g. {unknown[:5]}")
    return plan


def _sd2_te_to_ldm(te_keys: dict[str, str], plan: Plan) -> list[str]:
    """Add the SD2 OpenCLIP targets to ``plan``; ``te_keys`` maps canonical → given key. Returns unknown."""
    inverse_top = {v: k for k, v in _OPENCLIP_TOP.items()}
    inverse_layer = {v: k for k, v in _OPENCLIP_LAYER.items()}
    src = {canonical: source_name("text_encoder", key) for canonical, key in te_keys.items()}
    unknown: list[str] = []
    layer_recipes: dict[int, dict[str, Recipe]] = {}
    for canonical in te_keys:
        if canonical in inverse_top:
            plan[SD2_TE_PREFIX + inverse_top[canonical]] = Recipe((src[canonical],), identity)
            continue
        match = _HF_LAYER_RE.match(canonical)
        module, _, param = match.group(2).rpartition(".") if match else ("", "", "")
        if match and module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            index = int(match.group(1))
            if module == "self_attn.q_proj":  # the fused tensor is made once, from q, k and v
                base = f"text_model.encoder.layers.{index}.self_attn."
                sources = tuple(src.get(f"{base}{p}_proj.{param}", "") for p in "qkv")
                if "" in sources:
                    raise ValueError(f"SD2 text encoder layer {index} lacks one of q/k/v_proj.{param}")
                layer_recipes.setdefault(index, {})[f"attn.in_proj_{param}"] = Recipe(sources, concat)
        elif match and module in inverse_layer:
            layer_recipes.setdefault(int(match.group(1)), {})[f"{inverse_layer[module]}.{param}"] = \
                Recipe((src[canonical],), identity)
        else:
            unknown.append(src[canonical])
    for index in sorted(layer_recipes):
        for name, recipe in layer_recipes[index].items():
            plan[f"{SD2_TE_PREFIX}transformer.resblocks.{index}.{name}"] = recipe
    if layer_recipes:
        last = max(layer_recipes)
        for name, recipe in layer_recipes[last].items():
            transform = recipe.transform if recipe.transform is concat else clone
            plan[f"{SD2_TE_PREFIX}transformer.resblocks.{last + 1}.{name}"] = Recipe(recipe.sources, transform)
        norm = src.get("text_model.final_layer_norm.weight")
        if norm is None:
            raise ValueError("SD2 text encoder lacks text_model.final_layer_norm.weight")
        # the width (and dtype) come from the final layer norm weight at apply time
        plan[SD2_TE_PREFIX + "text_projection"] = Recipe((norm,), _ones_like_width)
        plan[SD2_TE_PREFIX + "logit_scale"] = Recipe((), int_one)
    return unknown


def _ones_like_width(ts: list[Tensor]) -> Tensor:
    """Ones [hidden, hidden] where hidden is the length of the source (final layer norm weight)."""
    return ones_square(ts[0].shape[0], ts)


# --------------------------------------------------------------------------------------------------
# applying plans


def apply_plan(plan: Mapping[str, Recipe], get: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Lazily yield ``(target_key, tensor)`` for every plan entry, fetching sources with ``get``."""
    for target, recipe in plan.items():
        yield target, recipe.transform([get(s) for s in recipe.sources])


def convert_state_dict(plan: Mapping[str, Recipe], source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Apply ``plan`` to an in-memory (or lazy mapping) state dict whose keys are the plan's sources."""
    return dict(apply_plan(plan, source.__getitem__))


def ldm_to_diffusers(ldm_sd: Mapping[str, Tensor], configs: ModelConfigs) -> dict[str, dict[str, Tensor]]:
    """Convert an ldm state dict to ``{"unet": …, "vae": …, "text_encoder": …}`` (TE keys canonical)."""
    plans = ldm_to_diffusers_plan(ldm_sd.keys(), configs)
    return {component: convert_state_dict(plan, ldm_sd) for component, plan in plans.items()}


def diffusers_to_ldm(components: Mapping[str, Mapping[str, Tensor]], configs: ModelConfigs) -> dict[str, Tensor]:
    """Convert component state dicts (any of ``unet``, ``vae``, ``text_encoder``) to one ldm state dict."""
    plan = diffusers_to_ldm_plan({c: sd.keys() for c, sd in components.items()}, configs)

    def get(name: str) -> Tensor:
        component, key = split_source(name)
        return components[component][key]

    return dict(apply_plan(plan, get))
