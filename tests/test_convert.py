"""ldm <-> Diffusers key conversion, family detection and config inference from shapes."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.models.convert import (apply_plan, convert_state_dict, diffusers_to_ldm, diffusers_to_ldm_plan,
                                    ldm_component_keys, ldm_to_diffusers, ldm_to_diffusers_plan, split_source,
                                    te_canonical_to_module_keys, te_state_dict_to_canonical)
from library.models.detect import detect_ldm_family, infer_configs_from_ldm
from library.models.presets import ModelConfigs, get_preset

SMALL = ["tiny-sd1", "tiny-sd2", "mini-sd1", "mini-sd2"]
UNET_STRUCT = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels",
               "out_channels", "cross_attention_dim", "use_linear_projection", "attention_head_dim")
VAE_STRUCT = ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
              "down_block_types", "up_block_types")
TE_STRUCT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act")


def build_modules(cfg: ModelConfigs, meta: bool = False) -> dict[str, torch.nn.Module]:
    """The three component modules of a config (on the meta device: shapes only, no memory)."""
    device = torch.device("meta") if meta else torch.device("cpu")
    with device:
        return {"unet": UNet2DConditionModel.from_config(cfg.unet), "vae": AutoencoderKL.from_config(cfg.vae),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg.text_encoder))}


def component_state_dicts(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Diffusers-side state dicts, text encoder in the canonical (text_model.-prefixed) layout."""
    sds = {name: dict(m.state_dict()) for name, m in modules.items()}
    sds["text_encoder"] = te_state_dict_to_canonical(sds["text_encoder"])
    return sds


@cache
def random_components(preset: str) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded random values for every tensor (so a swapped mapping between equal shapes is caught)."""
    shapes = component_state_dicts(build_modules(get_preset(preset), meta=True))
    gen = torch.Generator().manual_seed(1234)
    return {c: {k: torch.randn(tuple(v.shape), generator=gen) for k, v in sd.items()} for c, sd in shapes.items()}


@cache
def ldm_of(preset: str) -> dict[str, torch.Tensor]:
    """An ldm single-file state dict written by our Diffusers -> ldm conversion."""
    return diffusers_to_ldm(random_components(preset), get_preset(preset))


def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape."""
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Key-for-key and bit-exact equality (dtype included)."""
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for key, value in a.items():
        assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("preset", SMALL)
def test_diffusers_ldm_diffusers_roundtrip(preset):
    cfg = get_preset(preset)
    comps = random_components(preset)
    plan = diffusers_to_ldm_plan({c: sd.keys() for c, sd in comps.items()}, cfg, strict=True)
    assert all(split_source(s)[0] in comps for r in plan.values() for s in r.sources)
    back = ldm_to_diffusers(ldm_of(preset), cfg)
    assert set(back) == {"unet", "vae", "text_encoder"}
    for component in comps:
        assert_same(back[component], comps[component])


@pytest.mark.parametrize("preset", SMALL)
def test_ldm_diffusers_ldm_roundtrip(preset):
    cfg = get_preset(preset)
    ldm = ldm_of(preset)
    extras = {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.rand(1000),
              "model_ema.diffusion_modelinput_blocks00weight": torch.rand(3)}
    if cfg.v2:  # the WD 1.4 variant's stray position ids: ignored, even with strict
        extras["cond_stage_model.model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    plans = ldm_to_diffusers_plan(list(ldm) + list(extras), cfg, strict=True)
    used, unused = ldm_component_keys(list(ldm) + list(extras), cfg)
    assert set(extras) <= set(unused)
    full = {**ldm, **extras}
    diff = {c: convert_state_dict(p, full) for c, p in plans.items()}
    again = diffusers_to_ldm(diff, cfg)
    assert_same(again, ldm)
    if cfg.v2:  # exactly the OpenCLIP extras are not read; they are re-synthesised identically
        n = cfg.text_encoder["num_hidden_layers"]
        dropped = {k for k in ldm if k.startswith(f"cond_stage_model.model.transformer.resblocks.{n}.")}
        dropped |= {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
        assert set(unused) == set(extras) | dropped and len(dropped) == 14
        assert ldm["cond_stage_model.model.logit_scale"].dtype == torch.int64
        assert torch.equal(ldm["cond_stage_model.model.text_projection"], torch.ones(32, 32))
    else:
        assert set(unused) == set(extras)
        dropped = set()
    assert sorted(used) == sorted(set(ldm) - dropped)


@pytest.mark.parametrize("preset", ["tiny-sd2", "mini-sd1"])
def test_outputs_serialise_with_safetensors(preset):
    """No two converted tensors share storage (q/k/v splits and synthesised copies are real copies)."""
    cfg = get_preset(preset)
    ldm = ldm_of(preset)
    safetensors.torch.save(ldm)
    for sd in ldm_to_diffusers(ldm, cfg).values():
        safetensors.torch.save(sd)


def test_apply_plan_is_lazy():
    cfg = get_preset("tiny-sd2")
    ldm = ldm_of("tiny-sd2")
    plan = ldm_to_diffusers_plan(ldm.keys(), cfg)["text_encoder"]
    fetched: list[str] = []

    def get(key):
        fetched.append(key)
        return ldm[key]

    it = apply_plan(plan, get)
    assert fetched == []
    key, _ = next(it)
    assert fetched == list(plan[key].sources)
    rest = dict(it)
    assert len(rest) == len(plan) - 1
    assert len(fetched) == sum(len(r.sources) for r in plan.values())


def test_sd1_text_encoder_variants():
    """SD1 TE keys without `text_model.` and a stored position_ids buffer are accepted."""
    cfg = get_preset("tiny-sd1")
    ldm = dict(ldm_of("tiny-sd1"))
    prefix = "cond_stage_model.transformer."
    variant = {}
    for key, value in ldm.items():
        if key.startswith(prefix + "text_model."):
            key = prefix + key[len(prefix + "text_model."):]
        variant[key] = value
    variant[prefix + "embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    back = ldm_to_diffusers(variant, cfg)
    assert_same(back["text_encoder"], random_components("tiny-sd1")["text_encoder"])
    assert ldm_component_keys(variant, cfg)[1] == [prefix + "embeddings.position_ids"]
    assert infer_configs_from_ldm(shapes_of(variant)).text_encoder["num_hidden_layers"] == 2


def test_strict_rejects_unknown_component_keys():
    cfg = get_preset("tiny-sd1")
    keys = list(ldm_of("tiny-sd1")) + ["model.diffusion_model.label_emb.0.0.weight"]
    assert "model.diffusion_model.label_emb.0.0.weight" in ldm_component_keys(keys, cfg)[1]
    with pytest.raises(ValueError):
        ldm_to_diffusers_plan(keys, cfg, strict=True)
    with pytest.raises(ValueError):
        diffusers_to_ldm_plan({"unet": ["add_embedding.linear_1.weight"]}, cfg, strict=True)


def test_te_helpers_match_installed_transformers():
    cfg = get_preset("tiny-sd1")
    torch.manual_seed(0)
    module = CLIPTextModel(CLIPTextConfig(**cfg.text_encoder))
    canonical = te_state_dict_to_canonical(module.state_dict())
    assert all(k.startswith("text_model.") for k in canonical)
    assert te_state_dict_to_canonical(canonical).keys() == canonical.keys()
    target = CLIPTextModel(CLIPTextConfig(**cfg.text_encoder))
    target.load_state_dict(te_canonical_to_module_keys(canonical, target), strict=True)
    for key, value in module.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------ key names


def test_ldm_key_names_like_real_sd():
    ldm = ldm_of("mini-sd1")
    p = "model.diffusion_model."
    for key in ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.3.0.op.weight",
                "input_blocks.4.0.skip_connection.weight", "input_blocks.11.0.out_layers.3.weight",
                "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", "time_embed.0.weight",
                "time_embed.2.bias", "out.0.weight", "out.2.weight", "input_blocks.0.0.weight"):
        assert p + key in ldm, key
    assert p + "output_blocks.11.2.conv.weight" not in ldm
    assert ldm[p + "input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)  # SD1: conv proj
    v = "first_stage_model."
    for key in ("decoder.up.3.block.0.conv1.weight", "decoder.up.3.upsample.conv.weight",
                "encoder.down.0.downsample.conv.weight", "encoder.mid.block_2.norm1.weight",
                "decoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.bias"):
        assert v + key in ldm, key
    assert v + "decoder.up.0.upsample.conv.weight" not in ldm
    assert v + "encoder.down.3.downsample.conv.weight" not in ldm
    assert ldm[v + "encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert ldm[v + "decoder.mid.attn_1.proj_out.weight"].shape == (32, 32, 1, 1)
    # decoder levels are numbered in reverse: ldm up.3 is Diffusers up_blocks.0
    comps = random_components("mini-sd1")
    assert torch.equal(ldm[v + "decoder.up.3.block.0.conv1.weight"],
                       comps["vae"]["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert p + "input_blocks.3.0.op.weight" in ldm
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in ldm
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in ldm

    tiny = ldm_of("tiny-sd1")
    assert p + "output_blocks.1.1.conv.weight" in tiny and p + "input_blocks.2.0.op.weight" in tiny


def test_sd2_key_names_and_synthesis():
    ldm = ldm_of("mini-sd2")
    comps = random_components("mini-sd2")["text_encoder"]
    p = "cond_stage_model.model."
    assert ldm[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert ldm[p + "positional_embedding"].shape == (77, 32)
    assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32)  # SD2: linear
    fused = ldm[p + "transformer.resblocks.1.attn.in_proj_bias"]
    base = "text_model.encoder.layers.1.self_attn."
    assert torch.equal(fused, torch.cat([comps[base + "q_proj.bias"], comps[base + "k_proj.bias"],
                                         comps[base + "v_proj.bias"]]))
    for name in ("ln_1.weight", "attn.in_proj_weight", "mlp.c_proj.bias", "attn.out_proj.weight"):
        assert torch.equal(ldm[p + f"transformer.resblocks.2.{name}"], ldm[p + f"transformer.resblocks.1.{name}"])
    assert p + "transformer.resblocks.3.ln_1.weight" not in ldm
    assert ldm[p + "logit_scale"].shape == () and int(ldm[p + "logit_scale"]) == 1
    assert not any("position_ids" in k for k in ldm)


# ------------------------------------------------------------------------------------------------ vs diffusers


@pytest.mark.parametrize("preset", ["mini-sd1", "mini-sd2"])
def test_matches_diffusers_single_file_converters(preset):
    from diffusers.loaders import single_file_utils as sfu

    cfg = get_preset(preset)
    ldm = ldm_of(preset)
    ours = ldm_to_diffusers(ldm, cfg)
    theirs = {"unet": sfu.convert_ldm_unet_checkpoint(ldm, cfg.unet),
              "vae": sfu.convert_ldm_vae_checkpoint(ldm, cfg.vae)}
    if cfg.v2:
        text_model = CLIPTextModel(CLIPTextConfig(**cfg.text_encoder))
        theirs["text_encoder"] = sfu.convert_open_clip_checkpoint(text_model, ldm)
    else:
        theirs["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ldm)
    for component in ("unet", "vae"):
        assert sorted(ours[component]) == sorted(theirs[component]), component
    # diffusers also emits the unused last OpenCLIP block / projection for non-23-layer models
    assert set(ours["text_encoder"]) <= set(theirs["text_encoder"])
    for component, sd in ours.items():
        for key, value in sd.items():
            assert torch.equal(value, theirs[component][key]), (component, key)


# ------------------------------------------------------------------------------------------------ inference


def ldm_shapes_for(cfg: ModelConfigs) -> dict[str, tuple[int, ...]]:
    """ldm key -> shape of a model, without allocating weights (meta tensors through the plan)."""
    comps = component_state_dicts(build_modules(cfg, meta=True))
    return shapes_of(diffusers_to_ldm(comps, cfg))


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_infer_real_configs(preset):
    cfg = get_preset(preset)
    shapes = ldm_shapes_for(cfg)
    assert len([k for k in shapes if k.startswith("model.diffusion_model.")]) == 686
    assert len([k for k in shapes if k.startswith("first_stage_model.")]) == 248
    inferred = infer_configs_from_ldm(shapes)
    assert inferred.unet == cfg.unet
    assert inferred.vae == cfg.vae
    assert inferred.text_encoder == cfg.text_encoder
    assert inferred.v2 == cfg.v2
    assert detect_ldm_family(shapes) == preset


@pytest.mark.parametrize("preset", SMALL)
def test_infer_small_configs_build_same_shapes(preset):
    cfg = get_preset(preset)
    inferred = infer_configs_from_ldm(ldm_shapes_for(cfg))
    assert inferred.v2 == cfg.v2
    for got, want, keys in ((inferred.unet, cfg.unet, UNET_STRUCT), (inferred.vae, cfg.vae, VAE_STRUCT),
                            (inferred.text_encoder, cfg.text_encoder, TE_STRUCT)):
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    want = component_state_dicts(build_modules(cfg, meta=True))
    got = component_state_dicts(build_modules(inferred, meta=True))
    for component in want:
        assert shapes_of(got[component]) == shapes_of(want[component]), component


def test_infer_vae_only_file():
    cfg = get_preset("mini-sd1")
    vae = {k[len("first_stage_model."):]: v for k, v in ldm_shapes_for(cfg).items()
           if k.startswith("first_stage_model.")}
    inferred = infer_configs_from_ldm(vae)
    assert {k: inferred.vae[k] for k in VAE_STRUCT} == {k: cfg.vae[k] for k in VAE_STRUCT}
    plans = ldm_to_diffusers_plan(vae, inferred)
    assert len(plans["vae"]) == len(vae) and not plans["unet"] and not plans["text_encoder"]


# ------------------------------------------------------------------------------------------------ detection


def test_detect_families():
    sd1 = ldm_shapes_for(get_preset("tiny-sd1"))
    sd2 = ldm_shapes_for(get_preset("tiny-sd2"))
    assert detect_ldm_family(sd1) == "sd1"
    assert detect_ldm_family(list(sd2)) == "sd2"
    real_sd2_unet_only = {k: v for k, v in ldm_shapes_for(get_preset("sd2")).items()
                          if k.startswith("model.diffusion_model.")}
    assert detect_ldm_family(real_sd2_unet_only) == "sd2"
    assert detect_ldm_family(list(real_sd2_unet_only)) == "sd1"  # names alone cannot tell
    sdxl = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "first_stage_model.encoder.conv_in.weight"]
    assert detect_ldm_family(sdxl) == "sdxl"
    assert detect_ldm_family(sdxl[:2]) == "sdxl"
    lora = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert detect_ldm_family(lora) == "lora"
    vae = [k for k in sd1 if k.startswith("first_stage_model.")]
    assert detect_ldm_family(vae) == "vae_only"
    assert detect_ldm_family([k[len("first_stage_model."):] for k in vae]) == "vae_only"
    assert detect_ldm_family(["encoder.down_blocks.0.resnets.0.conv1.weight"]) == "not_sd"
    assert detect_ldm_family(["foo.weight", "bar.bias"]) == "not_sd"
    assert detect_ldm_family([]) == "not_sd"


def test_detect_kohya_lora_fixture():
    path = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "reference" / \
        "kohya_sd15_lora_unet.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert detect_ldm_family(keys) == "lora"
