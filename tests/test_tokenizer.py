"""The offline SD1/SD2 CLIP tokenizers built from the bundled BPE file, and the --tokenizer_cache_dir folder."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pytest

from library.errors import UserError
from library.models import tokenizer as tok_mod
from library.models.tokenizer import (BOS_TOKEN_ID, EOS_TOKEN_ID, V1_CACHE_NAME, V2_CACHE_NAME, build_tokenizer,
                                      bundled_vocab_and_merges, load_tokenizer, save_tokenizer)

BOS, EOS = BOS_TOKEN_ID, EOS_TOKEN_ID
CAT_PHOTO = [49406, 320, 1125, 539, 320, 2368, 49407]


def char_word_id(ch: str) -> int:
    """Id of a printable-ASCII one-character word ``ch</w>``: the second block of 256 starts at '!'."""
    return 256 + ord(ch) - ord("!")


def byte_level(text: str) -> str:
    """The byte-level BPE spelling of ``text`` (each UTF-8 byte as its printable stand-in)."""
    chars = tok_mod._byte_unicode_chars()  # stand-ins: printable bytes first, then the others in byte order
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_of_index = printable + others
    stand_in = {byte: chars[i] for i, byte in enumerate(byte_of_index)}
    return "".join(stand_in[b] for b in text.encode("utf-8"))


@pytest.fixture(scope="module")
def sd1():
    """The SD1 tokenizer, built once for this module."""
    return build_tokenizer(False)


@pytest.fixture(scope="module")
def sd2():
    """The SD2 tokenizer, built once for this module."""
    return build_tokenizer(True)


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    """The bundled vocabulary, token → id."""
    return bundled_vocab_and_merges()[0]


def test_bundled_file_is_the_openai_vocabulary():
    digest = hashlib.sha256(tok_mod.BPE_PATH.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_vocab_layout(vocab):
    _, merges = bundled_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == char_word_id("a") == 320
    assert merges[0] == ("i", "n") and vocab["in"] == 512  # first merge follows the 2 × 256 byte entries
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert sorted(vocab.values()) == list(range(49408))


def test_special_tokens_and_padding(sd1, sd2):
    for tok in (sd1, sd2):
        assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (BOS, EOS, 77)
        assert len(tok) == 49408
    assert sd1.pad_token == "<|endoftext|>" and sd1.pad_token_id == EOS
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0


def test_a_photo_of_a_cat(sd1, sd2):
    assert sd1("a photo of a cat").input_ids == CAT_PHOTO
    assert sd2("a photo of a cat").input_ids == CAT_PHOTO
    padded1 = sd1("a photo of a cat", padding="max_length", truncation=True, max_length=77).input_ids
    padded2 = sd2("a photo of a cat", padding="max_length", truncation=True, max_length=77).input_ids
    assert padded1 == CAT_PHOTO + [EOS] * 70
    assert padded2 == CAT_PHOTO + [0] * 70


@pytest.mark.parametrize("text", ["A  Photo\tof a CAT", "  a photo\n of   a cat  ", "A PHOTO OF A CAT"])
def test_lowercase_and_whitespace_cleaning(sd1, text):
    assert sd1(text).input_ids == CAT_PHOTO


def test_punctuation_digits_and_contractions(sd1, vocab):
    # punctuation runs and single digits are words of their own; "'m" / "'t" split off
    assert sd1("hello, world.").input_ids == [BOS, vocab["hello</w>"], char_word_id(","), vocab["world</w>"],
                                              char_word_id("."), EOS]
    assert sd1("1234").input_ids == [BOS, *(char_word_id(d) for d in "1234"), EOS]
    assert sd1("a_b-c").input_ids == [BOS, *(char_word_id(c) for c in "a_b-c"), EOS]
    assert sd1("I'm here").input_ids == [BOS, char_word_id("i"), vocab["'m</w>"], vocab["here</w>"], EOS]
    assert sd1("don't").input_ids == [BOS, vocab["don</w>"], vocab["'t</w>"], EOS]


def test_emoji_and_non_ascii(sd1, vocab):
    cat_emoji = vocab[byte_level("🐱") + "</w>"]
    assert cat_emoji == 22979
    assert sd1("🐱 cat").input_ids == [BOS, cat_emoji, 2368, EOS]
    cafe = vocab[byte_level("café") + "</w>"]
    assert sd1("Café").input_ids == [BOS, cafe, EOS]  # lowercased, then one BPE word
    ids = sd1("naïve").input_ids
    assert len(ids) > 3 and "".join(sd1.convert_ids_to_tokens(ids[1:-1])) == byte_level("naïve") + "</w>"


def test_sd2_pad_token_is_split_out_of_text(sd1, sd2, vocab):
    # "!" is SD2's (special) padding token, so "!!" becomes two id-0 tokens; SD1 keeps the BPE word "!!"
    assert sd1("cat!!").input_ids == [BOS, 2368, vocab["!!</w>"], EOS]
    assert sd2("cat!!").input_ids == [BOS, 2368, 0, 0, EOS]


def test_long_text_truncated_with_eos_kept(sd1, sd2, vocab):
    word = vocab["word</w>"]
    for tok in (sd1, sd2):
        ids = tok("word " * 100, padding="max_length", truncation=True, max_length=77).input_ids
        assert ids == [BOS] + [word] * 75 + [EOS]


def test_ftfy_is_not_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy now raises ImportError
    assert build_tokenizer(False)("a photo of a cat").input_ids == CAT_PHOTO


def test_builds_are_independent_and_fast(sd1):
    start = time.perf_counter()
    first = build_tokenizer(False)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0  # about 0.05 s once the vocabulary is parsed
    first.add_tokens(["<my-new-token>"])
    assert len(first) == 49409
    assert len(build_tokenizer(False)) == 49408 and len(sd1) == 49408


def test_cache_dir_round_trip(tmp_path, sd1):
    tok = load_tokenizer(False, tmp_path)
    folder = tmp_path / V1_CACHE_NAME
    names = {p.name for p in folder.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    assert [p.name for p in tmp_path.iterdir()] == [V1_CACHE_NAME]  # no temporary left behind
    texts = ["a photo of a cat", "hello, world.", "🐱 Café  cat!!"]
    assert [tok(t).input_ids for t in texts] == [sd1(t).input_ids for t in texts]

    # the second call reads the folder: a changed special token there is picked up
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["pad_token"] = "!"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    again = load_tokenizer(False, tmp_path)
    assert again.pad_token_id == 0
    assert [again(t).input_ids for t in texts[:2]] == [sd1(t).input_ids for t in texts[:2]]


def test_cache_dir_v2_folder(tmp_path, sd2):
    tok = load_tokenizer(True, tmp_path)
    assert (tmp_path / V2_CACHE_NAME / "vocab.json").is_file()
    assert tok.pad_token_id == 0
    reloaded = load_tokenizer(True, tmp_path)
    assert reloaded.pad_token_id == 0 and reloaded.model_max_length == 77
    padded = reloaded("a photo of a cat", padding="max_length", truncation=True, max_length=77).input_ids
    assert padded == sd2("a photo of a cat", padding="max_length", truncation=True, max_length=77).input_ids


def test_cache_dir_reads_transformers4_layout(tmp_path, sd1):
    load_tokenizer(False, tmp_path)
    (tmp_path / V1_CACHE_NAME / "tokenizer.json").unlink(missing_ok=True)  # leave vocab.json + merges.txt
    tok = load_tokenizer(False, tmp_path)
    assert tok("a photo of a cat, 🐱").input_ids == sd1("a photo of a cat, 🐱").input_ids


def test_cache_dir_empty_folder_is_filled(tmp_path):
    (tmp_path / V1_CACHE_NAME).mkdir()
    load_tokenizer(False, tmp_path)
    assert (tmp_path / V1_CACHE_NAME / "merges.txt").is_file()


def test_cache_dir_errors(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(UserError, match="--tokenizer_cache_dir"):
        load_tokenizer(False, not_a_dir)
    other = tmp_path / "cache" / V1_CACHE_NAME
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--tokenizer_cache_dir.*holds no saved tokenizer"):
        load_tokenizer(False, tmp_path / "cache")
    assert (other / "notes.txt").read_text() == "mine"  # left alone
    broken = tmp_path / "broken" / V2_CACHE_NAME
    broken.mkdir(parents=True)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="--tokenizer_cache_dir: cannot load"):
        load_tokenizer(True, tmp_path / "broken")


def test_save_tokenizer_writes_vocab_and_merges(tmp_path, sd2, vocab):
    target = tmp_path / "model" / "tokenizer"
    save_tokenizer(sd2, target)
    assert json.loads((target / "vocab.json").read_text(encoding="utf-8")) == vocab
    lines = (target / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894 and lines[1] == "i n"
    save_tokenizer(sd2, target)  # replacing an existing folder works and leaves no temporaries
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["tokenizer"]
    from transformers import CLIPTokenizer

    loaded = CLIPTokenizer.from_pretrained(str(target))
    assert loaded.pad_token_id == 0 and loaded("a photo of a cat").input_ids == CAT_PHOTO


def test_save_tokenizer_keeps_added_tokens(tmp_path):
    tok = build_tokenizer(False)
    tok.add_tokens(["<sks>"])
    save_tokenizer(tok, tmp_path / "tokenizer")
    from transformers import CLIPTokenizer

    loaded = CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert len(loaded) == 49409 and loaded.convert_tokens_to_ids("<sks>") == 49408
    assert Path(tmp_path / "tokenizer" / "vocab.json").is_file()
