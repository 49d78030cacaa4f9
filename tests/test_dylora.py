"""networks.dylora: LoRA file layout, per-step random rank, cut-out ranks, create_network_from_weights."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from safetensors import safe_open

from library.errors import UserError
from networks import dylora, lora

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])


@pytest.fixture(scope="module")
def tiny():
    """A tiny SD1 model with real (seeded random) weights."""
    from library.models.random_model import build_random_model

    return build_random_model("tiny-sd1", seed=0)


def fresh(tiny):
    """Independent copies of the text encoder and UNet."""
    return copy.deepcopy(tiny.text_encoder), copy.deepcopy(tiny.unet)


def randomize(network, seed: int = 0) -> None:
    """Give every chunk non-zero weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0.0, 0.05, generator=g)


@torch.no_grad()
def outputs(te, unet) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states and UNet noise prediction on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return {"te": te(IDS).last_hidden_state, "unet": unet(sample, torch.tensor([500]), ctx).sample}


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Every named output equal within ``atol``."""
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"{k} differs")


def test_saved_file_has_lora_layout(tiny, tmp_path):
    te, unet = fresh(tiny)
    dy = dylora.create_network(1.0, 4, 2, None, te, unet, unit="2", conv_dim="4", conv_alpha="1")
    plain = lora.create_network(1.0, 4, 2, None, te, unet, conv_dim="4", conv_alpha="2")
    assert {k: v.shape for k, v in dy.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(m.unit == 2 and m.num_chunks == 2 for m in dy.all_loras())
    assert dy.module_dims() == plain.module_dims()  # 3×3 convs use network_dim/alpha, conv_alpha unused
    randomize(dy)
    path = tmp_path / "dy.safetensors"
    dy.save_weights(path, torch.float16, {"ss_network_module": "networks.dylora", "ss_network_args": '{"unit": "2"}'})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(plain.state_dict())
        assert f.metadata()["ss_network_module"] == "networks.dylora"
        assert "sshs_model_hash" in f.metadata()
        down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
    module = dict(dy.named_children())["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert torch.equal(down, torch.cat([module.lora_down_0, module.lora_down_1]).half())


def test_training_forward_uses_all_components_with_slot_scale(tiny):
    te, unet = fresh(tiny)
    network = dylora.create_network(1.0, 6, 3, None, te, unet, unit="2")
    network.apply_to(te, unet)
    randomize(network)
    module = next(m for m in network.unet_loras if not m.is_conv)
    network.train()
    x = torch.randn(2, 5, module.org_module.in_features)
    for slot in (0, 2, 4):
        out = module(x)  # the hooked forward draws its own random slot
        delta = module.lora_forward(x, slot=slot)
        down, up = module.get_weights()
        expected = (x @ down.T @ up.T) * (3 / 6) * math.sqrt(6 / (slot + 2))
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0)
        trainable = [i for i in range(3) if getattr(module, f"lora_down_{i}").requires_grad]
        assert trainable == [slot // 2]
        assert out.shape == module.org_forward(x).shape
    module.zero_grad(set_to_none=True)
    module.lora_forward(x, slot=2).sum().backward()
    grads = [getattr(module, f"lora_up_{i}").grad is not None for i in range(3)]
    assert grads == [False, True, False]


def test_random_slots_are_unit_multiples(tiny):
    te, unet = fresh(tiny)
    network = dylora.create_network(1.0, 8, 1, None, te, unet, unit="4")
    random.seed(0)
    slots = {network.unet_loras[0].pick_slot() for _ in range(200)}
    assert slots == {0, 4}


@pytest.mark.parametrize("rank", [2, 4, 6])
def test_chosen_rank_equals_cut_out_lora(tiny, rank):
    te, unet = fresh(tiny)
    network = dylora.create_network(1.0, 6, 3, None, te, unet, unit="2", conv_dim="6")
    network.apply_to(te, unet)
    randomize(network)
    network.eval()
    network.set_rank(rank)
    ours = outputs(te, unet)
    network.set_rank(None)
    full = outputs(te, unet)

    cut = network.state_dict_at_rank(rank)
    assert all(v.shape[0] == rank for k, v in cut.items() if k.endswith("lora_down.weight"))
    te2, unet2 = fresh(tiny)
    plain, _ = lora.create_network_from_weights(1.0, None, None, te2, unet2, weights_sd=cut)
    plain.apply_to(te2, unet2)
    plain.load_state_dict(cut)
    assert_close(ours, outputs(te2, unet2))
    if rank == 6:
        assert_close(full, ours)
    with pytest.raises(ValueError):
        network.set_rank(3)


def test_create_network_from_weights_round_trip(tiny, tmp_path):
    te, unet = fresh(tiny)
    network = dylora.create_network(1.0, 4, 1, None, te, unet, unit="2")
    network.apply_to(te, unet)
    randomize(network)
    network.eval()
    path = tmp_path / "dy.pt"
    network.save_weights(path, None, None)
    expected = outputs(te, unet)

    te2, unet2 = fresh(tiny)
    other, sd = dylora.create_network_from_weights(1.0, path, None, te2, unet2, unit="2")
    assert other.module_dims() == network.module_dims()
    other.apply_to(te2, unet2)
    info = other.load_state_dict(sd)
    assert not info.missing_keys and not info.unexpected_keys
    other.eval()
    assert_close(outputs(te2, unet2), expected, atol=1e-6)

    # the same file as a plain LoRA gives the same (full-rank, eval) result, and merges
    te3, unet3 = fresh(tiny)
    plain, sd = lora.create_network_from_weights(1.0, path, None, te3, unet3, for_inference=True)
    plain.merge_to(te3, unet3, sd)
    assert_close(outputs(te3, unet3), expected)

    with pytest.raises(UserError, match="unit"):
        dylora.create_network_from_weights(1.0, path, None, te2, unet2, unit="3")
    with pytest.raises(RuntimeError, match="alpha"):
        other.load_state_dict({k: v for k, v in sd.items() if not k.endswith("fc1.alpha")})


@pytest.mark.parametrize("kwargs, match", [
    ({"unit": "3"}, "unit"),
    ({"unit": "x"}, "unit"),
    ({"conv_dim": "2"}, "conv_dim"),
    ({"block_dims": "1"}, "block_dims"),
])
def test_bad_network_args(tiny, kwargs, match):
    with pytest.raises(UserError, match=f"--network_args {match}"):
        dylora.create_network(1.0, 4, 1, None, tiny.text_encoder, tiny.unet, **kwargs)


def test_dylora_network_moves_between_devices_and_dtypes():
    """nn.Module.to() must work (a method named _apply once shadowed torch's own)."""
    from library.models.random_model import build_random_model
    from networks.dylora import create_network

    m = build_random_model("tiny-sd1", seed=0)
    net = create_network(1.0, 4, 1, m.vae, m.text_encoder, m.unet, unit="2")
    net.apply_to(m.text_encoder, m.unet)
    net.to("cpu").to(torch.float64)
    assert all(p.dtype == torch.float64 for p in net.parameters())
