"""Tag every image of a folder with a WD1.4 tagger (ONNX) and write ``<image name>.txt`` beside it.

    python finetune/tag_images_by_wd14_tagger.py --batch_size 4 train_data
    python finetune/tag_images_by_wd14_tagger.py --model_dir my_tagger --thresh 0.5 --remove_underscore train_data

The model folder (``--model_dir``, default ``wd14_tagger_model``) holds ``model.onnx`` and
``selected_tags.csv``, as published in SmilingWolf's WD1.4 tagger repositories on the Hugging Face Hub;
missing files are downloaded from ``--repo_id``. The model runs with onnxruntime (CUDA when available).
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from finetune.image_batches import (  # noqa: E402
    RunStats,
    check_positive,
    check_workers,
    images_to_write,
    add_overwrite_argument,
    iter_image_batches,
    output_extension,
    report_failures,
    timed_batches,
    write_text_file,
)
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
DEFAULT_MODEL_DIR = "wd14_tagger_model"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
TAGS_HEADER = ["tag_id", "name", "category", "count"]
CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = "0", "4", "9"
DEFAULT_IMAGE_SIZE = 448  # used when the model's input size is dynamic


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names and defaults)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("train_data_dir", help="folder of the images to tag")
    p.add_argument("--repo_id", default=DEFAULT_REPO_ID,
                   help=f"Hugging Face Hub repository to download missing model files from (default {DEFAULT_REPO_ID})")
    p.add_argument("--model_dir", default=DEFAULT_MODEL_DIR,
                   help=f"folder holding {MODEL_FILE} and {TAGS_FILE} (default {DEFAULT_MODEL_DIR})")
    p.add_argument("--force_download", action="store_true",
                   help="download the model files again even if --model_dir has them")
    p.add_argument("--batch_size", type=int, default=1, help="images per model call (default 1)")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="decode and preprocess images in this many worker processes (default: in the main process)")
    p.add_argument("--caption_extension", default=".txt", help="extension of the tag files (default .txt)")
    p.add_argument("--caption_extention", default=None,
                   help="misspelled legacy alias of --caption_extension; overrides it when given")
    p.add_argument("--thresh", type=float, default=0.35, help="confidence threshold for a tag (default 0.35)")
    p.add_argument("--general_threshold", type=float, default=None,
                   help="threshold for general tags (default: --thresh)")
    p.add_argument("--character_threshold", type=float, default=None,
                   help="threshold for character tags (default: --thresh)")
    add_overwrite_argument(p)
    p.add_argument("--recursive", action="store_true", help="also tag the images in sub-folders")
    p.add_argument("--remove_underscore", action="store_true",
                   help="write tags longer than 3 characters with spaces instead of underscores (keeps ^_^, >_<)")
    p.add_argument("--undesired_tags", default="",
                   help="comma-separated tags never to write, e.g. 'solo,simple background'")
    p.add_argument("--debug", action="store_true", help="print the character and general tags of each image")
    p.add_argument("--frequency_tags", action="store_true",
                   help="at the end, print how often each written tag was used, most frequent first")
    return p


# --------------------------------------------------------------------------------------------------
# the model folder


def ensure_model_files(model_dir: str, repo_id: str, force_download: bool) -> None:
    """Download ``model.onnx`` / ``selected_tags.csv`` from ``repo_id`` when missing (all when forced).

    Raises a one-line UserError naming ``--model_dir`` when they cannot be had (offline, unknown repo).
    """
    folder = Path(model_dir)
    wanted = [name for name in (MODEL_FILE, TAGS_FILE) if force_download or not (folder / name).is_file()]
    if not wanted:
        return
    logger.info("downloading %s from %s into %s", ", ".join(wanted), repo_id, folder)
    existed = folder.exists()
    try:
        from huggingface_hub import hf_hub_download

        for name in wanted:
            hf_hub_download(repo_id, name, local_dir=folder, force_download=force_download)
    except Exception as exc:  # hub, network and offline-mode errors have many types
        if not existed:  # leave no half-made folder behind
            shutil.rmtree(folder, ignore_errors=True)
        reason = _download_failure(exc)
        hint = (" (it holds the TensorFlow model of the reference; this version uses the ONNX export from the "
                "same repository)" if (folder / "saved_model.pb").is_file() else "")
        raise UserError(f"--model_dir {model_dir!r} lacks {' and '.join(wanted)}{hint} and downloading them from "
                        f"{repo_id!r} failed ({reason}); put {MODEL_FILE} and {TAGS_FILE} of a WD14 tagger in a "
                        "folder and pass it with --model_dir") from exc


def _download_failure(exc: Exception) -> str:
    """A short reason for a failed Hub download."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return "the Hub is offline or unreachable and the files are not in the local cache"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


@dataclass
class TagLabels:
    """``selected_tags.csv``: the name and category of model output ``i`` in row ``i``."""

    names: list[str]
    categories: list[str]

    def __len__(self) -> int:
        return len(self.names)


def read_tag_labels(path: Path) -> TagLabels:
    """Read ``selected_tags.csv`` (header ``tag_id,name,category,count``); UserError when malformed."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not rows or [c.strip() for c in rows[0]] != TAGS_HEADER:
        raise UserError(f"{path}: the first line must be {','.join(TAGS_HEADER)}")
    body = [row for row in rows[1:] if row]
    for number, row in enumerate(body, start=2):
        if len(row) < 3:
            raise UserError(f"{path} line {number}: expected {','.join(TAGS_HEADER)}, got {','.join(row)!r}")
    return TagLabels([row[1] for row in body], [row[2].strip() for row in body])


class Tagger:
    """An onnxruntime session of a WD14 tagger plus its input contract (NHWC, size, batch limit)."""

    def __init__(self, model_path: Path) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            options = ort.SessionOptions()
            # no busy-waiting between calls: spinning threads would take the CPU from the loader workers
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(model_path), options, providers=providers or None)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"cannot load the ONNX tagger {model_path}: {reason}") from exc
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = list(model_input.shape)
        if len(shape) != 4 or shape[3] != 3:
            raise UserError(f"{model_path}: the model input {self.input_name!r} has shape {shape}; a WD14 tagger "
                            "takes NHWC images [batch, height, width, 3]")
        self.height = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_IMAGE_SIZE
        self.width = shape[2] if isinstance(shape[2], int) and shape[2] > 0 else DEFAULT_IMAGE_SIZE
        self.max_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        output_shape = list(self.session.get_outputs()[0].shape)
        self.output_width = output_shape[-1] if output_shape and isinstance(output_shape[-1], int) else None

    def check_labels(self, labels: TagLabels) -> None:
        """UserError when the model's output width (if fixed) differs from the number of CSV rows."""
        if self.output_width is not None and self.output_width != len(labels):
            raise UserError(mismatch_message(self.output_width, len(labels)))

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, tags]`` for a float32 ``[N, H, W, 3]`` batch (split if the model's batch is fixed)."""
        step = self.max_batch or len(pixels)
        outputs = [self.session.run(None, {self.input_name: pixels[i : i + step]})[0]
                   for i in range(0, len(pixels), step)]
        return np.concatenate(outputs).reshape(len(pixels), -1)


def mismatch_message(outputs: int, rows: int) -> str:
    """The error for a model whose output does not match selected_tags.csv."""
    return (f"the tagger returns {outputs} values per image but {TAGS_FILE} lists {rows} tags: the model and the "
            "CSV do not belong together")


class TaggerPreprocess:
    """Picklable RGB uint8 image -> the tagger's input: BGR, white square padding, resized, float32 0-255."""

    def __init__(self, height: int, width: int) -> None:
        self.height = height
        self.width = width

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Pad to a square with white (the odd pixel at the bottom/right), resize with INTER_AREA when
        shrinking and INTER_LANCZOS4 otherwise, reverse the channels to BGR, keep values 0-255."""
        height, width = image.shape[:2]
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        square = cv2.copyMakeBorder(np.ascontiguousarray(image), top, side - height - top, left, side - width - left,
                                    cv2.BORDER_CONSTANT, value=(255, 255, 255))
        if (side, side) != (self.height, self.width):
            shrink = side > max(self.height, self.width)
            square = cv2.resize(square, (self.width, self.height),
                                interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
        return np.ascontiguousarray(square[:, :, ::-1], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# choosing tags


@dataclass
class TagRules:
    """Thresholds and filters applied to the probabilities of one image."""

    general_threshold: float
    character_threshold: float
    remove_underscore: bool
    undesired: frozenset[str]

    def display_name(self, name: str) -> str:
        """The tag as written: underscores become spaces in tags longer than 3 characters if asked."""
        return name.replace("_", " ") if self.remove_underscore and len(name) > 3 else name

    def select(self, probabilities: np.ndarray, labels: TagLabels) -> tuple[list[str], list[str]]:
        """``(general, character)`` tags at or above their thresholds, in CSV order; ratings never."""
        general: list[str] = []
        character: list[str] = []
        for name, category, probability in zip(labels.names, labels.categories, probabilities):
            if category == CATEGORY_GENERAL:
                chosen, threshold = general, self.general_threshold
            elif category == CATEGORY_CHARACTER:
                chosen, threshold = character, self.character_threshold
            else:
                continue
            if probability >= threshold:
                shown = self.display_name(name)
                if shown not in self.undesired:
                    chosen.append(shown)
        return general, character


def tag_rules(args: argparse.Namespace) -> TagRules:
    """The rules from the options; undesired tags are trimmed and spelled like the written tags."""
    rules = TagRules(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        remove_underscore=args.remove_underscore,
        undesired=frozenset(),
    )
    entries = [entry.strip() for entry in args.undesired_tags.split(",")]
    rules.undesired = frozenset(rules.display_name(entry) for entry in entries if entry)
    return rules


# --------------------------------------------------------------------------------------------------
# the run


def tag_images(paths: Sequence[Path], tagger: Tagger, labels: TagLabels, rules: TagRules, extension: str,
               batch_size: int, workers: int, debug: bool = False,
               counts: Counter | None = None) -> RunStats:
    """Tag ``paths`` and write one tag file per readable image; returns counts and timings.

    ``counts`` (when given) receives every written tag.
    """
    stats = RunStats()
    start = time.perf_counter()
    batches = iter_image_batches(paths, TaggerPreprocess(tagger.height, tagger.width), batch_size, workers)
    with tqdm(total=len(paths), desc="tags", unit="img", smoothing=0.0) as progress:
        for batch in timed_batches(batches, stats):
            progress.update(len(batch.paths) + len(batch.failures))
            if batch.pixels is None:
                continue
            model_start = time.perf_counter()
            probabilities = tagger.run(batch.pixels.numpy())
            stats.model_seconds += time.perf_counter() - model_start
            if probabilities.shape[1] != len(labels):
                raise UserError(mismatch_message(probabilities.shape[1], len(labels)))
            for path, row in zip(batch.paths, probabilities, strict=True):
                general, character = rules.select(row, labels)
                write_text_file(path, extension, ", ".join(general + character))
                stats.written += 1
                if counts is not None:
                    counts.update(general + character)
                if debug:
                    tqdm.write(f"\n{path}:\n  Character tags: {', '.join(character)}\n  General tags: {', '.join(general)}")
    stats.total_seconds = time.perf_counter() - start
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Tag the images of ``train_data_dir``; unreadable images are reported and skipped."""
    args = build_parser().parse_args(argv)
    check_positive(args.batch_size, "--batch_size")
    workers = check_workers(args.max_data_loader_n_workers)
    extension = output_extension(args.caption_extension, args.caption_extention)
    ensure_model_files(args.model_dir, args.repo_id, args.force_download)
    labels = read_tag_labels(Path(args.model_dir) / TAGS_FILE)
    tagger = Tagger(Path(args.model_dir) / MODEL_FILE)
    tagger.check_labels(labels)
    paths = images_to_write(args, extension)
    if not paths:
        return 0
    counts: Counter = Counter()
    stats = tag_images(paths, tagger, labels, tag_rules(args), extension, args.batch_size, workers,
                       debug=args.debug, counts=counts)
    logger.info(stats.summary("tag files"))
    report_failures(stats, "tag file")
    if args.frequency_tags:
        print("Tag frequencies:")
        for tag, count in sorted(counts.items(), key=lambda item: -item[1]):
            print(f"{tag}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
