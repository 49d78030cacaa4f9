"""finetune/make_captions_by_git.py end to end on tiny GIT models built here: a random one (captions
depend on the image) and a hand-wired one whose caption is a fixed word chain, for --remove_words."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from finetune import make_captions_by_git as git_script
from tests.test_captioning import _offline, caption_folder, corrupt, error_line, read_texts  # noqa: F401
from tests.train_util import run_script

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "with", "the", "word", "cat", "on", "it",
         "sign", "that", "says", "red", "blue", "grass", "sky", "house", "tree", "car", "girl"]
IDS = {w: i for i, w in enumerate(WORDS)}
HIDDEN = 32  # >= len(WORDS): the chain model uses one hidden channel per word


def save_git(folder: Path, num_layers: int, init: float):
    """Save a random tiny GIT model (32 px images) with a GitProcessor; returns the model."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    folder.mkdir(parents=True)
    vocab = folder.parent / f"{folder.name}_vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    processor = GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                             tokenizer=BertTokenizer(str(vocab)))
    config = GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=init),
        vocab_size=len(WORDS), hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, initializer_range=init,
        bos_token_id=IDS["[CLS]"], eos_token_id=IDS["[SEP]"], pad_token_id=IDS["[PAD]"])
    torch.manual_seed(0)
    model = GitForCausalLM(config).eval()
    processor.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory) -> Path:
    """A random GIT captioner whose (greedy) captions differ from image to image."""
    folder = tmp_path_factory.mktemp("git") / "tiny_git"
    save_git(folder, num_layers=1, init=0.2).save_pretrained(folder)
    return folder


CHAIN = ["[CLS]", "a", "dog", "with", "the", "word", "cat", "on", "it", "[SEP]"]


@pytest.fixture(scope="module")
def chain_git_dir(tmp_path_factory) -> Path:
    """A GIT model that always writes "a dog with the word cat on it".

    With no text layers the hidden state of a token is LayerNorm(word + position embedding); with one-hot
    word embeddings, zero position embeddings and an output matrix mapping each word's channel to the
    next word of CHAIN, greedy decoding follows the chain whatever the image.
    """
    import torch

    folder = tmp_path_factory.mktemp("git_chain") / "chain_git"
    model = save_git(folder, num_layers=0, init=0.02)
    with torch.no_grad():
        embeddings = model.git.embeddings
        embeddings.word_embeddings.weight.zero_()
        embeddings.word_embeddings.weight[:, : len(WORDS)] = 10 * torch.eye(len(WORDS))
        embeddings.position_embeddings.weight.zero_()
        embeddings.LayerNorm.weight.fill_(1.0)
        embeddings.LayerNorm.bias.zero_()
        model.output.weight.zero_()
        model.output.bias.zero_()
        for word, following in zip(CHAIN, CHAIN[1:]):
            model.output.weight[IDS[following], IDS[word]] = 1.0
    model.save_pretrained(folder)
    return folder


def test_captions_per_image_batch_independent_and_kept(tmp_path, git_dir):
    folder = caption_folder(tmp_path)
    argv = [folder, "--model_id", git_dir, "--max_length", "12"]
    assert run_script(git_script.main, argv) == 0
    single = read_texts(folder, ".caption")
    assert sorted(single) == ["img0.caption", "img1.caption", "img2.caption"]  # not recursive
    for text in single.values():
        assert text.endswith("\n") and text.count("\n") == 1 and text.strip()
        assert all(word in WORDS for word in text.split())
        assert len(text.split()) <= 12 - 1  # max_length counts the start token
    assert len(set(single.values())) > 1  # captions follow the image

    assert run_script(git_script.main, [*argv, "--batch_size", "2", "--max_data_loader_n_workers", "2",
                                        "--overwrite"]) == 0
    assert read_texts(folder, ".caption") == single  # greedy: batching and workers change nothing

    (folder / "img1.caption").write_text("my own caption\n", encoding="utf-8")
    assert run_script(git_script.main, [*argv, "--max_length", "4"]) == 0
    kept = read_texts(folder, ".caption")
    assert kept["img1.caption"] == "my own caption\n" and kept == {**single, "img1.caption": "my own caption\n"}
    assert run_script(git_script.main, [*argv, "--max_length", "4", "--overwrite", "--recursive",
                                        "--caption_extension", ".txt"]) == 0
    short = read_texts(folder, ".txt")
    assert sorted(short) == ["img0.txt", "img1.txt", "img2.txt", "sub/deep.txt"]
    assert all(len(text.split()) <= 3 for text in short.values())
    assert (folder / "img1.caption").read_text(encoding="utf-8") == "my own caption\n"


def test_remove_words(tmp_path, chain_git_dir, capsys):
    folder = caption_folder(tmp_path)
    assert run_script(git_script.main, [folder, "--model_id", chain_git_dir, "--batch_size", "2", "--debug"]) == 0
    assert set(read_texts(folder, ".caption").values()) == {"a dog with the word cat on it\n"}
    assert "img0.png a dog with the word cat on it" in capsys.readouterr().out
    assert run_script(git_script.main, [folder, "--model_id", chain_git_dir, "--remove_words", "--overwrite"]) == 0
    assert set(read_texts(folder, ".caption").values()) == {"a dog\n"}


@pytest.mark.parametrize("caption, expected", [
    ("a sign that says 'open' on it", "a sign"),
    ('a store with a sign that says "fresh fish" on it', "a store"),
    ("a box with the number 42 on the side of it", "a box of it"),
    ("a girl has the name mary on her shirt", "a girl"),
    ('a poster with the words "hello', "a poster hello"),
    ("a red car", "a red car"),
])
def test_remove_words_phrases(caption, expected):
    assert git_script.remove_words(caption) == expected


def test_corrupt_image_is_skipped(tmp_path, git_dir, caplog):
    folder = caption_folder(tmp_path)
    corrupt(folder / "broken.png")
    with caplog.at_level(logging.WARNING):
        assert run_script(git_script.main, [folder, "--model_id", git_dir, "--batch_size", "2",
                                            "--max_length", "6"]) == 0
    assert sorted(read_texts(folder, ".caption")) == ["img0.caption", "img1.caption", "img2.caption"]
    assert any("broken.png" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_offline_default_model_is_one_line(tmp_path, capsys):
    folder = caption_folder(tmp_path)
    assert run_script(git_script.main, [folder]) == 2  # default microsoft/git-large-textcaps, Hub offline
    err = error_line(capsys)
    assert "--model_id" in err and "microsoft/git-large-textcaps" in err and "local folder" in err
    assert not list(folder.rglob("*.caption"))


def test_bad_model_and_options(tmp_path, git_dir, capsys):
    from transformers import BlipConfig

    folder = caption_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    blip = tmp_path / "blip"
    BlipConfig().save_pretrained(blip)
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    cases = [([ "--model_id", empty], "not a transformers GIT captioning folder"),
             (["--model_id", blip], "is a 'blip' model, not a GIT captioner"),
             (["--model_id", a_file], "is a file"),
             (["--model_id", git_dir, "--max_length", "100"], "longer than the 64 text positions"),
             (["--model_id", git_dir, "--max_length", "1"], "--max_length"),
             (["--model_id", git_dir, "--batch_size", "0"], "--batch_size"),
             (["--model_id", git_dir, "--caption_extension", ".jpg"], "--caption_extension")]
    for extra, expected in cases:
        assert run_script(git_script.main, [folder, *extra]) == 2
        assert expected in error_line(capsys)
    assert not list(folder.rglob("*.caption"))
