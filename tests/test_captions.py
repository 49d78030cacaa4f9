"""Caption files and the per-draw caption pipeline with seeded RNGs (training_behaviour.md §9)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from library.data.captions import (
    CaptionError,
    CaptionOptions,
    caption_for_image,
    class_tokens_from_folder,
    find_caption_file,
    metadata_caption,
    process_caption,
    read_caption_file,
    resolve_token_warmup_step,
    warmup_token_count,
)

TEN = ", ".join(f"t{i}" for i in range(10))


def test_read_caption_file_first_line_bom_and_line_ends(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeff  1girl, solo  \r\nsecond line\r\n".encode("utf-8"))
    assert read_caption_file(path) == "1girl, solo"
    path.write_bytes(b"old mac\rsecond")
    assert read_caption_file(path) == "old mac"
    path.write_bytes("  caf\u00e9 \n".encode("utf-8"))
    assert read_caption_file(path) == "caf\u00e9"
    path.write_bytes(b"\n\nlater")
    assert read_caption_file(path) == ""  # blank first line: empty caption, like the reference
    path.write_bytes(b"")
    with pytest.raises(CaptionError, match="empty"):
        read_caption_file(path)
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(CaptionError, match="UTF-8"):
        read_caption_file(path)


def test_caption_sources_and_face_suffix_fallback(tmp_path: Path):
    (tmp_path / "cat.txt").write_text("a cat\n", encoding="utf-8")
    (tmp_path / "dog.txt").write_text("a dog\n", encoding="utf-8")
    assert find_caption_file(tmp_path / "cat.png", ".txt") == tmp_path / "cat.txt"
    assert find_caption_file(tmp_path / "cat_0010_0020_0030_0040.png", ".txt") == tmp_path / "cat.txt"
    assert find_caption_file(tmp_path / "cat.png", ".caption") is None
    assert caption_for_image(tmp_path / "dog.jpg", ".txt", "sks dog") == ("a dog", "file")
    assert caption_for_image(tmp_path / "bird.jpg", ".txt", "sks bird") == ("sks bird", "class")
    assert caption_for_image(tmp_path / "bird.jpg", ".txt", None) == ("", "none")
    assert class_tokens_from_folder("10_sks dog_v2") == (10, "sks dog_v2")
    assert class_tokens_from_folder("5") == (5, "")
    assert class_tokens_from_folder("images") is None


def test_metadata_caption():
    assert metadata_caption("a photo", "tag1, tag2") == "a photo, tag1, tag2"
    assert metadata_caption("a photo", "") == "a photo"
    assert metadata_caption(None, "tag1") == "tag1"
    assert metadata_caption(None, None) == ""


def test_no_options_leaves_caption_untouched_and_draws_nothing():
    rng = random.Random(0)
    state = rng.getstate()
    assert process_caption("a ,b,  c", CaptionOptions(), rng) == "a ,b,  c"
    assert rng.getstate() == state


def test_shuffle_keeps_first_tokens_and_is_seeded():
    options = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    seen = set()
    for seed in range(30):
        out = process_caption(" t0 ,t1," + TEN[8:], options, random.Random(seed))
        parts = out.split(", ")
        assert parts[:2] == ["t0", "t1"]
        assert sorted(parts[2:]) == [f"t{i}" for i in range(2, 10)]
        expected = [f"t{i}" for i in range(2, 10)]
        random.Random(seed).shuffle(expected)
        assert parts[2:] == expected
        seen.add(out)
    assert len(seen) > 20


def test_caption_dropout_rates():
    always = CaptionOptions(caption_dropout_rate=1.0, shuffle_caption=True)
    never = CaptionOptions(caption_dropout_rate=0.0)
    for seed in range(20):
        assert process_caption(TEN, always, random.Random(seed)) == ""
        assert process_caption(TEN, never, random.Random(seed)) == TEN
    half = CaptionOptions(caption_dropout_rate=0.5)
    dropped = sum(process_caption("x", half, random.Random(s)) == "" for s in range(200))
    assert 70 < dropped < 130


def test_caption_dropout_every_n_epochs():
    options = CaptionOptions(caption_dropout_every_n_epochs=2)
    rng = random.Random(0)
    results = [process_caption("x", options, rng, epoch=e) for e in range(0, 6)]
    assert results == ["", "x", "", "x", "", "x"]  # epoch 0 (a fresh worker's first batch) drops too


def test_tag_dropout_respects_keep_tokens():
    everything = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=3)
    assert process_caption(TEN, everything, random.Random(0)) == "t0, t1, t2"
    nothing = CaptionOptions(caption_tag_dropout_rate=0.0, shuffle_caption=True, keep_tokens=10)
    assert process_caption(TEN, nothing, random.Random(0)) == TEN
    some = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    out = process_caption(TEN, some, random.Random(4)).split(", ")
    assert out[0] == "t0" and 1 < len(out) < 10
    assert out == sorted(out, key=lambda t: int(t[1:]))  # no shuffle: order kept


def test_token_warmup_counts():
    assert resolve_token_warmup_step(0.5, 20) == 10
    assert resolve_token_warmup_step(0.01, 20) == 0  # floors to 0: warm-up off
    assert resolve_token_warmup_step(15, 20) == 15
    # N = 10, min 1, warm-up 10 steps: floor(step * 9 / 10) + 1
    assert [warmup_token_count(10, s, 1, 10) for s in (0, 1, 5, 9, 10, 50)] == [1, 1, 5, 9, 10, 10]
    assert [warmup_token_count(10, s, 3, 7) for s in (0, 3, 6, 7)] == [3, 6, 9, 10]
    assert warmup_token_count(10, 5, 1, 0) == 10

    options = CaptionOptions(token_warmup_step=0.5, token_warmup_min=1).resolved(max_train_steps=20)
    assert options.token_warmup_step == 10
    rng = random.Random(0)
    assert process_caption(TEN, options, rng, step=0) == "t0"
    assert process_caption(TEN, options, rng, step=5) == "t0, t1, t2, t3, t4"
    assert process_caption(TEN, options, rng, step=10) == TEN
    with pytest.raises(ValueError):
        process_caption(TEN, CaptionOptions(token_warmup_step=0.5), rng)


def test_warmup_applies_before_keep_and_shuffle():
    options = CaptionOptions(token_warmup_step=10, token_warmup_min=2, keep_tokens=3, shuffle_caption=True)
    assert process_caption(TEN, options, random.Random(0), step=0) == "t0, t1"
    out = process_caption(TEN, options, random.Random(0), step=5).split(", ")
    assert len(out) == 6 and out[:3] == ["t0", "t1", "t2"] and sorted(out[3:]) == ["t3", "t4", "t5"]


def test_replacements():
    rng = random.Random(0)
    assert process_caption("a sks dog", CaptionOptions(), rng, replacements={"sks": "<tok1> <tok2>"}) == (
        "a <tok1> <tok2> dog"
    )
    templates = ["a photo of <tok>", "a rendering of <tok>"]
    outs = {process_caption("ignored", CaptionOptions(), random.Random(s), replacements={"": templates})
            for s in range(20)}
    assert outs == set(templates)
    dropped = CaptionOptions(caption_dropout_rate=1.0)
    assert process_caption("x", dropped, rng, replacements={"": "template"}) == ""
