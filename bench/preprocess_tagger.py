"""WD14 tagger pipeline benchmark: images per second and how long the model waits for decoded images.

Usage: ``python bench/preprocess_tagger.py [--count 200] [--batch-size 4] [--workers 0 2] [--model light conv]
[--dir FOLDER] [--repeat 1]``.

Writes ``--count`` JPEGs with sides of 512-1024 px (textured, so they decode like photos) into a temporary
folder (or ``--dir``, reused when it already holds them) and a tiny 448x448 ONNX tagger, then runs
``finetune/tag_images_by_wd14_tagger.py``'s pipeline (decode, white square padding, INTER_AREA resize,
BGR float32, onnxruntime, tag files) with each worker count. Models: ``light`` (mean colour -> linear:
the model costs nothing, like a tagger on a fast GPU, so the loader is all there is) and ``conv`` (an 8x8
stride-8 convolution to 64 channels, ReLU, mean, linear: a few ms per image on the CPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.image_batches import find_images  # noqa: E402
from finetune.tag_images_by_wd14_tagger import (  # noqa: E402
    Tagger,
    TagRules,
    read_tag_labels,
    tag_images,
)

SIZE = 448
TAG_COUNT = 64


def textured_image(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A colour ramp with blurred and fine noise: JPEG-decodes about as slowly as a photo."""
    ramp_x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    ramp_y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    image = rng.uniform(40, 200, 3) + ramp_x * rng.uniform(-60, 60, 3) + ramp_y * rng.uniform(-60, 60, 3)
    coarse = rng.normal(0, 35, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    image = image + cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    image = image + rng.normal(0, 5, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs (quality 92) with random sides in 512-1024 px, once per folder."""
    marker = folder / f".made_{count}"
    if marker.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = (int(v) for v in rng.integers(512, 1025, 2))
        cv2.imwrite(str(folder / f"img{index:04d}.jpg"), textured_image(width, height, rng)[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
    marker.touch()


def make_model(folder: Path, kind: str) -> Path:
    """A WD14-style folder (``model.onnx`` taking [N, 448, 448, 3], ``selected_tags.csv``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    nodes = []
    initializers = [numpy_helper.from_array(np.array(1 / 255, np.float32), "scale")]
    if kind == "light":
        nodes += [helper.make_node("ReduceMean", ["input_1:0"], ["features"], axes=[1, 2], keepdims=0)]
        features = 3
    else:
        features = 64
        initializers.append(numpy_helper.from_array(rng.normal(0, 0.05, (features, 3, 8, 8)).astype(np.float32), "k"))
        nodes += [helper.make_node("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2]),
                  helper.make_node("Conv", ["nchw", "k"], ["conv"], strides=[8, 8]),
                  helper.make_node("Relu", ["conv"], ["act"]),
                  helper.make_node("ReduceMean", ["act"], ["features"], axes=[2, 3], keepdims=0)]
    initializers += [numpy_helper.from_array(rng.normal(0, 1, (features, TAG_COUNT)).astype(np.float32), "w"),
                     numpy_helper.from_array(np.zeros(TAG_COUNT, np.float32), "b")]
    nodes += [helper.make_node("Mul", ["features", "scale"], ["unit"]),
              helper.make_node("MatMul", ["unit", "w"], ["logits"]),
              helper.make_node("Add", ["logits", "b"], ["biased"]),
              helper.make_node("Sigmoid", ["biased"], ["predictions_sigmoid"])]
    graph = helper.make_graph(
        nodes, f"bench_{kind}",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", TAG_COUNT])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [
        f"{i},{'rating' if i < 4 else 'tag'}_{i},{9 if i < 4 else (4 if i >= TAG_COUNT - 8 else 0)},{1000 - i}"
        for i in range(TAG_COUNT)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    """Run the pipeline for every model kind and worker count and print one line each."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--model", nargs="+", default=["light", "conv"], choices=["light", "conv"])
    p.add_argument("--dir", type=Path, default=None, help="image folder to create or reuse (default: temporary)")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()

    temporary = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="bench_tagger_")) if temporary else args.dir
    try:
        start = time.perf_counter()
        make_images(root / "images", args.count)
        print(f"{args.count} JPEGs (512-1024 px) ready in {time.perf_counter() - start:.1f}s at {root / 'images'}")
        paths = find_images(str(root / "images"), False)
        rules = TagRules(0.35, 0.35, False, frozenset())
        print(f"{'model':>6} {'workers':>7} {'batch':>5} {'images/s':>9} {'wait share':>10} "
              f"{'model s':>8} {'wait s':>7} {'total s':>8}")
        for kind in args.model:
            folder = make_model(root / f"model_{kind}", kind)
            tagger = Tagger(folder / "model.onnx")
            labels = read_tag_labels(folder / "selected_tags.csv")
            for workers in args.workers:
                for _ in range(args.repeat):
                    stats = tag_images(paths, tagger, labels, rules, ".txt", args.batch_size, workers)
                    print(f"{kind:>6} {workers:>7} {args.batch_size:>5} {stats.images_per_second:>9.1f} "
                          f"{stats.wait_share:>10.0%} {stats.model_seconds:>8.2f} {stats.wait_seconds:>7.2f} "
                          f"{stats.total_seconds:>8.2f}")
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
