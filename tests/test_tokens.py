"""Caption tokenization (75/150/225 chunks, SD1 vs SD2), text encoding with clip_skip, weighted captions."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from library.data.tokens import (apply_token_weights, check_max_token_length, chunk_count, encode_tokens,
                                 encode_weighted_captions, encode_weighted_tokens, final_layer_norm,
                                 parse_prompt_attention, tokenize_caption, tokenize_captions,
                                 tokenize_captions_no_padding, tokenize_weighted_caption,
                                 tokenize_weighted_captions)
from library.errors import UserError
from library.models.tokenizer import build_tokenizer

BOS, EOS, PAD2 = 49406, 49407, 0
CAT = 2368  # "cat</w>"


def cats(k: int) -> str:
    """A caption of exactly k tokens (each "cat" is one token)."""
    return " ".join(["cat"] * k)


def row(*parts: tuple[int, int]) -> list[int]:
    """A token row from (token, count) pairs; asserts the 77-position length."""
    out = [tok for tok, count in parts for _ in range(count)]
    assert len(out) == 77
    return out


@pytest.fixture(scope="module")
def sd1():
    """The SD1 tokenizer, built once for this module."""
    return build_tokenizer(False)


@pytest.fixture(scope="module")
def sd2():
    """The SD2 tokenizer, built once for this module."""
    return build_tokenizer(True)


@pytest.fixture(scope="module")
def text_encoder():
    """A tiny random CLIP text model (2 layers, width 32) with a fixed seed."""
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=1, max_position_embeddings=77)
    return CLIPTextModel(config).eval()


def plain_states(model, ids2d: torch.Tensor) -> torch.Tensor:
    """The model's final output for ids (N, 77), computed directly."""
    with torch.no_grad():
        return model(ids2d)[0]


# ---------------------------------------------------------------- options

def test_max_token_length_values():
    assert check_max_token_length(None) is None and check_max_token_length(75) is None
    assert check_max_token_length(150) == 150 and check_max_token_length(225) == 225
    assert [chunk_count(v) for v in (None, 75, 150, 225)] == [1, 1, 2, 3]
    for bad in (0, 76, 100, 300, True):
        with pytest.raises(UserError, match="--max_token_length.*75.*150.*225"):
            check_max_token_length(bad)


# ---------------------------------------------------------------- standard tokenization

def test_standard_tokenization_sd1_sd2(sd1, sd2):
    ids1 = tokenize_caption(sd1, "a photo of a cat", None)
    ids2 = tokenize_caption(sd2, "a photo of a cat", 75)
    assert ids1.dtype == torch.long and ids1.shape == ids2.shape == (1, 77)
    head = [BOS, 320, 1125, 539, 320, CAT, EOS]
    assert ids1[0].tolist() == head + [EOS] * 70
    assert ids2[0].tolist() == head + [PAD2] * 70
    assert tokenize_caption(sd1, cats(90), None)[0].tolist() == row((BOS, 1), (CAT, 75), (EOS, 1))


# Hand-computed layouts for captions of k tokens: (k, max_token_length, SD1 rows, SD2 rows)
LAYOUTS = [
    (3, 150,
     [row((BOS, 1), (CAT, 3), (EOS, 73)), row((BOS, 1), (EOS, 76))],
     [row((BOS, 1), (CAT, 3), (EOS, 1), (PAD2, 72)), row((BOS, 1), (EOS, 1), (PAD2, 75))]),
    (75, 150,  # exactly one full chunk
     [row((BOS, 1), (CAT, 75), (EOS, 1)), row((BOS, 1), (EOS, 76))],
     [row((BOS, 1), (CAT, 75), (EOS, 1)), row((BOS, 1), (EOS, 1), (PAD2, 75))]),
    (80, 150,
     [row((BOS, 1), (CAT, 75), (EOS, 1)), row((BOS, 1), (CAT, 5), (EOS, 71))],
     [row((BOS, 1), (CAT, 75), (EOS, 1)), row((BOS, 1), (CAT, 5), (EOS, 1), (PAD2, 70))]),
    (200, 150,  # over the budget: truncated, every chunk full and closed by EOS
     [row((BOS, 1), (CAT, 75), (EOS, 1))] * 2,
     [row((BOS, 1), (CAT, 75), (EOS, 1))] * 2),
    (80, 225,
     [row((BOS, 1), (CAT, 75), (EOS, 1)), row((BOS, 1), (CAT, 5), (EOS, 71)), row((BOS, 1), (EOS, 76))],
     [row((BOS, 1), (CAT, 75), (EOS, 1)), row((BOS, 1), (CAT, 5), (EOS, 1), (PAD2, 70)),
      row((BOS, 1), (EOS, 1), (PAD2, 75))]),
    (150, 225,
     [row((BOS, 1), (CAT, 75), (EOS, 1))] * 2 + [row((BOS, 1), (EOS, 76))],
     [row((BOS, 1), (CAT, 75), (EOS, 1))] * 2 + [row((BOS, 1), (EOS, 1), (PAD2, 75))]),
    (225, 225,  # fills the whole budget
     [row((BOS, 1), (CAT, 75), (EOS, 1))] * 3,
     [row((BOS, 1), (CAT, 75), (EOS, 1))] * 3),
]


@pytest.mark.parametrize("k,length,rows1,rows2", LAYOUTS)
def test_long_caption_chunks(sd1, sd2, k, length, rows1, rows2):
    assert tokenize_caption(sd1, cats(k), length).tolist() == rows1
    assert tokenize_caption(sd2, cats(k), length).tolist() == rows2


def test_batch_shapes(sd1):
    assert tokenize_captions(sd1, ["a cat", cats(100)], 225).shape == (2, 3, 77)
    ids = tokenize_captions_no_padding(sd1, ["a cat", "a photo of a cat"])
    assert ids.tolist() == [[BOS, 320, CAT, EOS, EOS, EOS, EOS], [BOS, 320, 1125, 539, 320, CAT, EOS]]
    assert tokenize_captions_no_padding(sd1, [cats(100)]).shape == (1, 77)


# ---------------------------------------------------------------- encoding

def test_encode_shapes_and_clip_skip_one(sd1, text_encoder):
    with torch.no_grad():
        for length, expected in ((None, 77), (150, 152), (225, 227)):
            ids = tokenize_captions(sd1, ["a cat", cats(100)], length)
            out = encode_tokens(text_encoder, ids, None, length)
            assert out.shape == (2, expected, 32)
            assert torch.allclose(encode_tokens(text_encoder, ids, 1, length), out)
        flat = tokenize_captions(sd1, ["a cat"], None)[:, 0]  # (B, 77) is accepted too
        assert encode_tokens(text_encoder, flat, None, None).shape == (1, 77, 32)


def test_clip_skip_two_is_penultimate_layer_plus_final_norm(sd2, text_encoder):
    ids = tokenize_captions(sd2, ["a photo of a cat", "hello, world"], None)
    with torch.no_grad():
        out = encode_tokens(text_encoder, ids, 2, None)
        hidden = text_encoder(ids[:, 0], output_hidden_states=True).hidden_states
        norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        expected = norm(hidden[-2])
        assert torch.allclose(out, expected, atol=1e-6)
        assert not torch.allclose(out, encode_tokens(text_encoder, ids, None, None))
        three = encode_tokens(text_encoder, ids, 3, None)  # 2 layers: -3 is the embeddings output
        assert torch.allclose(three, norm(hidden[0]), atol=1e-6)
    with pytest.raises(UserError, match="--clip_skip"):
        encode_tokens(text_encoder, ids, 4, None)
    with pytest.raises(UserError, match="--clip_skip"):
        encode_tokens(text_encoder, ids, 0, None)


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_chunk_reassembly_positions(sd1, text_encoder, clip_skip):
    ids = tokenize_captions(sd1, [cats(80), "a photo of a cat"], 225)
    with torch.no_grad():
        out = encode_tokens(text_encoder, ids, clip_skip, 225)
        per_chunk = [encode_tokens(text_encoder, ids[:, j], clip_skip, None) for j in range(3)]
    assert out.shape == (2, 227, 32)
    assert torch.allclose(out[:, 0], per_chunk[0][:, 0], atol=1e-6)  # BOS of chunk 0
    for j in range(3):
        assert torch.allclose(out[:, 1 + 75 * j: 76 + 75 * j], per_chunk[j][:, 1:76], atol=1e-6)
    assert torch.allclose(out[:, 226], per_chunk[2][:, 76], atol=1e-6)  # last state of the last chunk


def test_encode_dtype_and_no_token_padding(sd1, text_encoder):
    ids = tokenize_captions(sd1, ["a cat"], 150)
    with torch.no_grad():
        assert encode_tokens(text_encoder, ids, None, 150, dtype=torch.bfloat16).dtype == torch.bfloat16
        short = tokenize_captions_no_padding(sd1, ["a cat", "a photo of a cat"])
        out = encode_tokens(text_encoder, short, 2, 150, dtype=torch.bfloat16)  # all bypassed (§7.6)
        assert out.shape == (2, 7, 32) and out.dtype == torch.float32
        assert torch.allclose(out, plain_states(text_encoder, short))
    with pytest.raises(ValueError, match="chunks"):
        encode_tokens(text_encoder, ids, None, 225)


def test_final_layer_norm_lookup(text_encoder):
    norm = final_layer_norm(text_encoder)
    assert isinstance(norm, torch.nn.LayerNorm)

    class Wrapped(torch.nn.Module):  # like DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert final_layer_norm(Wrapped(text_encoder)) is norm

    class OldStyle(torch.nn.Module):  # transformers 4 keeps it under text_model
        def __init__(self):
            super().__init__()
            self.text_model = torch.nn.Module()
            self.text_model.final_layer_norm = torch.nn.LayerNorm(4)

    old = OldStyle()
    assert final_layer_norm(old) is old.text_model.final_layer_norm
    with pytest.raises(TypeError):
        final_layer_norm(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- weighted captions: parsing

@pytest.mark.parametrize("text,expected", [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("(a)", [("a", 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),
    ("((a:1.5))", [("a", 1.5 * 1.1)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)]),
    ("(a", [("a", 1.1)]),  # unclosed opener closed at the end
    ("x [y", [("x ", 1.0), ("y", 1 / 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),  # unmatched closers are literal
    (r"\(a\) \[b\] \\", [("(a) [b] \\", 1.0)]),  # escapes
    ("a:b c:1.2)", [("a:b c:1.2)", 1.0)]),  # ':' without an open '(' is literal
    ("(a:b)", [("a:b", 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # not a number: literal (A1111 would fail)
    ("(a)(b)", [("ab", 1.1)]),  # equal neighbours merge
    ("BREAK", [("BREAK", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    result = parse_prompt_attention(text)
    assert [t for t, _ in result] == [t for t, _ in expected]
    assert [w for _, w in result] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_parse_spec_example():
    result = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert [t for t, _ in result] == ["a ", "house", " ", "on", " a ", "hill", ", sun, ", "sky", "."]
    assert [w for _, w in result] == pytest.approx([1.0, 1.573, 1.1, 1.0, 1.1, 0.55, 1.1, 1.4641, 1.1])


# ---------------------------------------------------------------- weighted captions: tokens and weights

def test_tokenize_weighted_caption(sd1, sd2):
    dog = sd1("dog", add_special_tokens=False).input_ids
    assert len(dog) == 1
    for tok in (sd1, sd2):  # EOS padding for SD1 and SD2 alike
        ids, weights = tokenize_weighted_caption(tok, "a (cat:1.5) [dog]", None)
        assert ids.shape == weights.shape == (1, 77) and weights.dtype == torch.float32
        assert ids[0].tolist() == [BOS, 320, CAT, dog[0]] + [EOS] * 73
        assert weights[0, :4].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1])
        assert weights[0, 4:].tolist() == [1.0] * 73


def test_weighted_caption_chunks_and_truncation(sd1, caplog):
    ids, weights = tokenize_weighted_caption(sd1, f"({cats(80)})", 150)
    assert ids.tolist() == [row((BOS, 1), (CAT, 75), (EOS, 1)), row((BOS, 1), (CAT, 5), (EOS, 71))]
    assert weights[0].tolist() == pytest.approx([1.0] + [1.1] * 75 + [1.0])
    assert weights[1].tolist() == pytest.approx([1.0] + [1.1] * 5 + [1.0] * 71)
    with caplog.at_level(logging.WARNING, logger="library.data.tokens"):
        ids, _ = tokenize_weighted_caption(sd1, cats(80), None)
    assert ids.tolist() == [row((BOS, 1), (CAT, 75), (EOS, 1))]
    assert "truncated" in caplog.text
    assert tokenize_weighted_caption(sd1, "", 225)[0].tolist() == [row((BOS, 1), (EOS, 76))]


def test_weighted_batch_uses_longest_caption(sd2):
    ids, weights = tokenize_weighted_captions(sd2, ["(cat)", cats(76)], 225)
    assert ids.shape == weights.shape == (2, 2, 77)
    assert ids[0].tolist() == [row((BOS, 1), (CAT, 1), (EOS, 75)), row((BOS, 1), (EOS, 76))]
    assert weights[0, 0, 1].item() == pytest.approx(1.1)
    assert (weights[0].flatten() != 1.0).sum().item() == 1
    assert ids[1].tolist() == [row((BOS, 1), (CAT, 75), (EOS, 1)), row((BOS, 1), (CAT, 1), (EOS, 75))]
    ids, _ = tokenize_weighted_captions(sd2, ["a", "b"], 225)
    assert ids.shape == (2, 1, 77)


# ---------------------------------------------------------------- weighted captions: math

def test_apply_token_weights_on_fixed_tensor():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    weights = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    out = apply_token_weights(states, weights)
    # sample 0: mean 2.5; weighted [[2, 4], [3, 4]] has mean 3.25; rescaled by 2.5 / 3.25
    expected0 = torch.tensor([[2.0, 4.0], [3.0, 4.0]]) * (2.5 / 3.25)
    assert torch.allclose(out[0], expected0)
    assert torch.equal(out[1], states[1])
    assert out.mean(dim=(1, 2)).tolist() == pytest.approx(states.mean(dim=(1, 2)).tolist())
    assert torch.equal(apply_token_weights(states, torch.ones(2, 2)), states)
    with pytest.raises(ValueError):
        apply_token_weights(states, torch.ones(2, 3))


def test_apply_token_weights_chunked_shape_and_dtype():
    states = torch.randn(1, 154, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    weights = torch.ones(1, 2, 77)
    weights[0, 1, 5] = 1.5
    out = apply_token_weights(states, weights)
    assert out.shape == (1, 154, 4) and out.dtype == torch.bfloat16


def test_encode_weighted_keeps_every_chunk_state(sd1, text_encoder):
    ids, weights = tokenize_weighted_captions(sd1, [cats(80), "a (photo:1.3) of a cat"], 225)
    with torch.no_grad():
        states = encode_weighted_tokens(text_encoder, ids)
        assert states.shape == (2, 154, 32)
        for j in range(2):
            assert torch.allclose(states[:, 77 * j: 77 * (j + 1)], plain_states(text_encoder, ids[:, j]), atol=1e-6)
        skipped = encode_weighted_tokens(text_encoder, ids, clip_skip=2)
        assert not torch.allclose(skipped, states)
        final = encode_weighted_captions(sd1, text_encoder, [cats(80), "a (photo:1.3) of a cat"], 225)
    assert torch.allclose(final, apply_token_weights(states, weights))
    assert final.mean(dim=(1, 2)).tolist() == pytest.approx(states.mean(dim=(1, 2)).tolist(), rel=1e-4)


def test_apply_token_weights_zero_mean_stays_finite():
    from library.data.tokens import apply_token_weights

    states = torch.zeros(1, 4, 3)
    states[0, 0] = torch.tensor([1.0, -1.0, 0.0])  # mean exactly 0
    out = apply_token_weights(states, torch.tensor([[2.0, 1.0, 1.0, 1.0]]))
    assert torch.isfinite(out).all() and torch.equal(out[0, 0], torch.tensor([2.0, -2.0, 0.0]))
