"""finetune/make_captions.py (BLIP via transformers) and finetune/tag_images_by_wd14_tagger.py (ONNX),
end to end on tiny models built here: a random BLIP captioner and hand-made ONNX taggers whose outputs
are fixed functions of the mean colour they are fed, so the expected tags follow from the images."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from finetune import make_captions, tag_images_by_wd14_tagger as tagger_script
from tests.train_util import run_script


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No Hub access in tests, whatever the environment says."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def solid(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> Path:
    """A one-colour image of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def noisy(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A random-noise image (different images give the captioner different inputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def error_line(capsys) -> str:
    """The one ``error:`` line the script printed on stderr (progress bars may share stderr)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def corrupt(path: Path) -> Path:
    """A file with an image extension that is not an image."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return path


# ==================================================================================================
# BLIP captioning

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "dog", "cat", "red",
         "blue", "on", "the", "grass", "sky", "with", "big", "small", "house", "tree", "car", "girl"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    """A random tiny BLIP captioner with its processor (BERT WordPiece vocab, 32 px images)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    root = tmp_path_factory.mktemp("blip")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    ids = {w: i for i, w in enumerate(WORDS)}
    config = BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         projection_dim=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=ids["[DEC]"], eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"],
                         sep_token_id=ids["[SEP]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=32, image_text_hidden_size=32)
    torch.manual_seed(0)
    model_dir = root / "tiny_blip"
    BlipForConditionalGeneration(config).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model_dir


def caption_folder(tmp_path: Path) -> Path:
    """Three noise images at the top and one in a sub-folder."""
    folder = tmp_path / "data"
    for i in range(3):
        noisy(folder / f"img{i}.png", seed=i)
    noisy(folder / "sub" / "deep.jpg", seed=9)
    return folder


def read_texts(folder: Path, extension: str) -> dict[str, str]:
    """``{relative path: text}`` of every file with ``extension`` under ``folder``."""
    return {str(p.relative_to(folder)): p.read_text(encoding="utf-8") for p in sorted(folder.rglob(f"*{extension}"))}


def test_captions_written_per_image_and_reproducible(tmp_path, blip_dir):
    folder = caption_folder(tmp_path)
    argv = [folder, "--caption_weights", blip_dir, "--batch_size", "2", "--seed", "7", "--max_length", "20"]
    assert run_script(make_captions.main, argv) == 0
    first = read_texts(folder, ".caption")
    assert sorted(first) == ["img0.caption", "img1.caption", "img2.caption"]  # not recursive: no sub/deep
    for text in first.values():
        assert text.endswith("\n") and text.count("\n") == 1
        assert not text.startswith("a picture of")  # the prompt is not part of the caption
    assert any(text.strip() for text in first.values())
    assert all(len(text.split()) <= 20 - 4 for text in first.values())

    assert run_script(make_captions.main, [*argv, "--overwrite"]) == 0
    assert read_texts(folder, ".caption") == first

    argv[argv.index("7")] = "8"
    assert run_script(make_captions.main, argv) == 0
    assert read_texts(folder, ".caption") == first  # existing captions are kept without --overwrite
    assert run_script(make_captions.main, [*argv, "--overwrite"]) == 0
    assert read_texts(folder, ".caption") != first  # sampling: another seed, other captions


def test_existing_tag_files_are_kept_unless_overwrite(tmp_path, tagger_dir):
    folder = colour_folder(tmp_path)
    (folder / "red.txt").write_text("my own tags\n", encoding="utf-8")
    assert run_script(tagger_script.main, [folder, "--model_dir", tagger_dir]) == 0
    assert (folder / "red.txt").read_text(encoding="utf-8") == "my own tags\n"
    assert (folder / "blue.txt").is_file()
    assert run_script(tagger_script.main, [folder, "--model_dir", tagger_dir, "--overwrite"]) == 0
    assert (folder / "red.txt").read_text(encoding="utf-8") != "my own tags\n"


def test_recursive_workers_and_legacy_extension(tmp_path, blip_dir):
    folder = caption_folder(tmp_path)
    base = [folder, "--caption_weights", blip_dir, "--recursive", "--seed", "3", "--max_length", "12"]
    assert run_script(make_captions.main, base + ["--caption_extention", ".txt"]) == 0
    in_process = read_texts(folder, ".txt")
    assert sorted(in_process) == ["img0.txt", "img1.txt", "img2.txt", "sub/deep.txt"]
    assert not list(folder.rglob("*.caption"))

    for path in folder.rglob("*.txt"):
        path.unlink()
    assert run_script(make_captions.main, base + ["--caption_extension", ".txt", "--max_data_loader_n_workers", "2"]) == 0
    assert read_texts(folder, ".txt") == in_process  # loader workers do not change the captions


def test_beam_search_ignores_the_seed(tmp_path, blip_dir):
    folder = caption_folder(tmp_path)
    results = []
    for seed in ("1", "2"):
        argv = [folder, "--caption_weights", blip_dir, "--beam_search", "--num_beams", "2", "--seed", seed,
                "--max_length", "10", "--min_length", "6", "--batch_size", "3"]
        assert run_script(make_captions.main, argv) == 0
        results.append(read_texts(folder, ".caption"))
    assert results[0] == results[1]
    assert all(len(text.split()) >= 6 - 4 for text in results[0].values())  # min_length counts the prompt


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, blip_dir, caplog):
    folder = caption_folder(tmp_path)
    corrupt(folder / "broken.png")
    with caplog.at_level(logging.WARNING):
        code = run_script(make_captions.main, [folder, "--caption_weights", blip_dir, "--batch_size", "2",
                                               "--max_length", "10", "--max_data_loader_n_workers", "1"])
    assert code == 0
    assert sorted(read_texts(folder, ".caption")) == ["img0.caption", "img1.caption", "img2.caption"]
    assert any("broken.png" in record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)


def test_offline_hub_id_names_caption_weights(tmp_path, capsys):
    folder = caption_folder(tmp_path)
    assert run_script(make_captions.main, [folder]) == 2  # default: Salesforce/blip-image-captioning-large
    err = error_line(capsys)
    assert "--caption_weights" in err and "Salesforce/blip-image-captioning-large" in err
    assert not list(folder.rglob("*.caption"))


@pytest.mark.parametrize("extra, expected", [
    (["--top_p", "0"], "--top_p"),
    (["--min_length", "80"], "--min_length"),
    (["--max_length", "100"], "longer than the 64 positions"),
    (["--batch_size", "0"], "--batch_size"),
    (["--num_beams", "0"], "--num_beams"),
    (["--max_data_loader_n_workers", "-1"], "--max_data_loader_n_workers"),
    (["--caption_extension", ".png"], "--caption_extension"),
    (["--caption_extention", ""], "--caption_extention"),
    (["--max_length", "4"], "--max_length"),
])
def test_bad_options_are_one_line_errors(tmp_path, blip_dir, capsys, extra, expected):
    folder = caption_folder(tmp_path)
    assert run_script(make_captions.main, [folder, "--caption_weights", blip_dir] + extra) == 2
    assert expected in error_line(capsys)
    assert not list(folder.rglob("*.caption"))


def test_unusable_caption_weights(tmp_path, capsys):
    folder = caption_folder(tmp_path)
    not_blip = tmp_path / "empty_model"
    not_blip.mkdir()
    pth = tmp_path / "model_large_caption.pth"
    pth.write_bytes(b"pickle")
    for weights, expected in ((not_blip, "not a transformers BLIP captioning folder"),
                              (pth, "checkpoints of the original BLIP code are not supported")):
        assert run_script(make_captions.main, [folder, "--caption_weights", weights]) == 2
        err = error_line(capsys)
        assert "--caption_weights" in err and expected in err
    assert run_script(make_captions.main, [tmp_path / "missing"]) == 2
    assert "train_data_dir" in capsys.readouterr().err


# ==================================================================================================
# WD14 tagger

RATINGS = ["general", "sensitive", "questionable", "explicit"]
# name, category, probability = weights . (mean of input channel 0, 1, 2) / 255 + bias
TAGS = [(r, "9", (0, 0, 0), 0.99) for r in RATINGS] + [
    ("first_channel", "0", (1, 0, 0), 0.0),
    ("second_channel", "0", (0, 1, 0), 0.0),
    ("third_channel", "0", (0, 0, 1), 0.0),
    ("solo", "0", (0, 0, 0), 0.5),
    (">_<", "0", (0, 0, 0), 0.9),
    ("hatsune_miku", "4", (0, 0, 0), 0.45),
    ("kaname_madoka", "4", (0, 0, 0.5), 0.0),
]


def write_tags_csv(path: Path, tags=TAGS, header="tag_id,name,category,count") -> None:
    """A selected_tags.csv for ``tags`` in the WD14 layout."""
    lines = [header] + [f"{1000 + i},{name},{category},{500 - i}" for i, (name, category, _, _) in enumerate(tags)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_tagger(folder: Path, size: int = 32, batch: int | str = "N", tags=TAGS, channels_last: bool = True,
                output_width: int | str | None = None) -> Path:
    """A WD14-style model folder: an ONNX graph computing ``channel means / 255 @ W + b`` and its CSV."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([w for _, _, w, _ in tags], dtype=np.float32).T  # [3, T]
    bias = np.array([b for _, _, _, b in tags], dtype=np.float32)
    shape = [batch, size, size, 3] if channels_last else [batch, 3, size, size]
    axes = [1, 2] if channels_last else [2, 3]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=axes, keepdims=0),
         helper.make_node("Mul", ["mean", "scale"], ["unit"]),
         helper.make_node("MatMul", ["unit", "weights"], ["logits"]),
         helper.make_node("Add", ["logits", "bias"], ["predictions_sigmoid"])],
        "tiny_tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, output_width or len(tags)])],
        [numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
         numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    write_tags_csv(folder / "selected_tags.csv", tags)
    return folder


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    return make_tagger(tmp_path_factory.mktemp("tagger") / "wd14")


def colour_folder(tmp_path: Path) -> Path:
    """red.png, blue.png, green.png (square) and red_strip.png (wide: padded with white rows)."""
    folder = tmp_path / "images"
    solid(folder / "red.png", (255, 0, 0), (50, 50))
    solid(folder / "blue.png", (0, 0, 255), (20, 20))
    solid(folder / "green.jpg", (0, 255, 0), (64, 64))
    solid(folder / "red_strip.png", (255, 0, 0), (64, 16))
    return folder


def tag(folder: Path, model_dir: Path, *extra) -> dict[str, str]:
    """Run the tagger on ``folder``; ``{image stem: written line without newline}``."""
    assert run_script(tagger_script.main, [folder, "--model_dir", model_dir, "--overwrite", *extra]) == 0
    result = {}
    for path in sorted(folder.rglob("*.txt")):
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n") and text.count("\n") == 1
        result[str(path.relative_to(folder).with_suffix(""))] = text[:-1]
    return result


def test_tags_follow_bgr_0_255_input_with_white_padding(tmp_path, tagger_dir):
    folder = colour_folder(tmp_path)
    tags = tag(folder, tagger_dir)
    # BGR: red is channel 2, blue channel 0; values 0-255 (scaled by 1/255 in the graph); ratings never written
    assert tags["red"] == "third_channel, solo, >_<, hatsune_miku, kaname_madoka"
    assert tags["blue"] == "first_channel, solo, >_<, hatsune_miku"
    assert tags["green"] == "second_channel, solo, >_<, hatsune_miku"
    # 64x16 red padded to 64x64 with white: channels 0 and 1 average 0.75
    assert tags["red_strip"] == "first_channel, second_channel, third_channel, solo, >_<, hatsune_miku, kaname_madoka"


def test_thresholds(tmp_path, tagger_dir):
    folder = colour_folder(tmp_path)
    assert tag(folder, tagger_dir, "--thresh", "0.46")["red"] == "third_channel, solo, >_<, kaname_madoka"
    split = tag(folder, tagger_dir, "--general_threshold", "0.6", "--character_threshold", "0.4")
    assert split["red"] == "third_channel, >_<, hatsune_miku, kaname_madoka"
    assert split["blue"] == "first_channel, >_<, hatsune_miku"
    # one of the two given: the other falls back to --thresh
    assert tag(folder, tagger_dir, "--thresh", "0.95", "--character_threshold", "0.3")["blue"] == "first_channel, hatsune_miku"


def test_remove_underscore_and_undesired_tags(tmp_path, tagger_dir):
    folder = colour_folder(tmp_path)
    tags = tag(folder, tagger_dir, "--remove_underscore")
    assert tags["red"] == "third channel, solo, >_<, hatsune miku, kaname madoka"  # >_< is 3 characters: kept
    # entries are trimmed and may be given in either spelling
    tags = tag(folder, tagger_dir, "--remove_underscore", "--undesired_tags", "solo, hatsune_miku,third channel")
    assert tags["red"] == ">_<, kaname madoka"
    tags = tag(folder, tagger_dir, "--undesired_tags", ">_<,general")
    assert tags["blue"] == "first_channel, solo, hatsune_miku"


def test_batches_workers_recursion_and_extension(tmp_path, tagger_dir):
    folder = colour_folder(tmp_path)
    solid(folder / "sub" / "blue2.webp", (0, 0, 255), (33, 17))
    single = tag(folder, tagger_dir, "--recursive")
    assert set(single) == {"red", "blue", "green", "red_strip", "sub/blue2"}
    for path in folder.rglob("*.txt"):
        path.unlink()
    batched = tag(folder, tagger_dir, "--recursive", "--batch_size", "2", "--max_data_loader_n_workers", "2")
    assert batched == single  # 5 images in batches of 2: every file still gets its own tags
    assert run_script(tagger_script.main, [folder, "--model_dir", tagger_dir, "--caption_extention", ".tags",
                                           "--batch_size", "3"]) == 0
    assert sorted(p.name for p in folder.glob("*.tags")) == ["blue.tags", "green.tags", "red.tags", "red_strip.tags"]


def test_fixed_batch_model_and_input_size(tmp_path):
    model_dir = make_tagger(tmp_path / "fixed", size=24, batch=1)
    folder = colour_folder(tmp_path)
    tags = tag(folder, model_dir, "--batch_size", "3")
    assert tags["red_strip"].startswith("first_channel, second_channel, third_channel")
    assert tags["blue"].startswith("first_channel, solo")


def test_corrupt_image_skipped_and_reports(tmp_path, tagger_dir, caplog, capsys):
    folder = colour_folder(tmp_path)
    corrupt(folder / "broken.jpg")
    (folder / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        tags = tag(folder, tagger_dir, "--batch_size", "2", "--frequency_tags", "--debug")
    assert set(tags) == {"red", "blue", "green", "red_strip"}
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "broken.jpg" in warnings and "empty.png" in warnings
    out = capsys.readouterr().out
    lines = out[out.index("Tag frequencies:"):].splitlines()
    assert lines[1:4] == ["solo: 4", ">_<: 4", "hatsune_miku: 4"]
    assert "third_channel: 2" in lines
    assert "Character tags: hatsune_miku" in out


def test_preprocess_contract():
    prep = tagger_script.TaggerPreprocess(4, 4)
    image = np.zeros((3, 4, 3), np.uint8)  # 3 rows, 4 columns: one white row added, at the bottom
    image[:, :, 0] = 200  # red
    image[:, :, 2] = 10  # blue
    out = prep(image)
    assert out.dtype == np.float32 and out.shape == (4, 4, 3)
    assert out[:3, :, 0].tolist() == [[10.0] * 4] * 3 and out[:3, :, 2].tolist() == [[200.0] * 4] * 3  # BGR
    assert out[3].tolist() == [[255.0] * 3] * 4
    tall = np.zeros((4, 1, 3), np.uint8)  # 3 columns of padding: 1 left, 2 right
    out = prep(tall)
    assert out[0, :, 0].tolist() == [255.0, 0.0, 255.0, 255.0]

    big = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    expected = cv2.resize(big, (8, 8), interpolation=cv2.INTER_AREA)[:, :, ::-1].astype(np.float32)
    np.testing.assert_array_equal(tagger_script.TaggerPreprocess(8, 8)(big), expected)
    small = big[:5, :5]
    expected = cv2.resize(small, (8, 8), interpolation=cv2.INTER_LANCZOS4)[:, :, ::-1].astype(np.float32)
    np.testing.assert_array_equal(tagger_script.TaggerPreprocess(8, 8)(small), expected)


def test_missing_model_folder_offline(tmp_path, capsys):
    folder = colour_folder(tmp_path)
    model_dir = tmp_path / "no_model"
    assert run_script(tagger_script.main, [folder, "--model_dir", model_dir]) == 2
    err = error_line(capsys)
    assert "--model_dir" in err and "model.onnx" in err
    assert not model_dir.exists()  # no half-made folder left behind
    assert not list(folder.glob("*.txt"))

    old = tmp_path / "keras_model"
    old.mkdir()
    (old / "saved_model.pb").write_bytes(b"")
    (old / "selected_tags.csv").write_text("tag_id,name,category,count\n", encoding="utf-8")
    assert run_script(tagger_script.main, [folder, "--model_dir", old]) == 2
    err = error_line(capsys)
    assert "TensorFlow model of the reference" in err and "selected_tags.csv" not in err.split("failed")[0]


def test_force_download_offline_keeps_the_files(tmp_path, capsys):
    folder = colour_folder(tmp_path)
    model_dir = make_tagger(tmp_path / "complete")
    before = (model_dir / "model.onnx").read_bytes()
    assert run_script(tagger_script.main, [folder, "--model_dir", model_dir, "--force_download"]) == 2
    assert "--model_dir" in error_line(capsys)
    assert (model_dir / "model.onnx").read_bytes() == before and (model_dir / "selected_tags.csv").is_file()


def test_bad_model_files(tmp_path, capsys):
    folder = colour_folder(tmp_path)
    bad_header = make_tagger(tmp_path / "bad_header")
    write_tags_csv(bad_header / "selected_tags.csv", header="id,name,category,count")
    mismatch = make_tagger(tmp_path / "mismatch")  # output width in the graph: found at load
    write_tags_csv(mismatch / "selected_tags.csv", tags=TAGS[:-1])
    dynamic = make_tagger(tmp_path / "dynamic", output_width="T")  # found at the first batch
    write_tags_csv(dynamic / "selected_tags.csv", tags=TAGS[1:])
    nchw = make_tagger(tmp_path / "nchw", channels_last=False)
    garbage = make_tagger(tmp_path / "garbage")
    (garbage / "model.onnx").write_bytes(b"not onnx")
    cases = [(bad_header, "the first line must be tag_id,name,category,count"),
             (mismatch, "returns 11 values per image but selected_tags.csv lists 10 tags"),
             (dynamic, "returns 11 values per image but selected_tags.csv lists 10 tags"),
             (nchw, "NHWC"), (garbage, "cannot load the ONNX tagger")]
    for model_dir, expected in cases:
        assert run_script(tagger_script.main, [folder, "--model_dir", model_dir]) == 2
        assert expected in error_line(capsys)
        assert not list(folder.glob("*.txt"))
    assert run_script(tagger_script.main, [folder, "--model_dir", tmp_path / "nchw", "--caption_extension", ".JPG"]) == 2
    assert "--caption_extension" in capsys.readouterr().err
    assert run_script(tagger_script.main, [folder, "--model_dir", tmp_path / "nchw", "--batch_size", "0"]) == 2
    assert "--batch_size" in capsys.readouterr().err
