"""The part the transformers captioning scripts share (``make_captions.py``: BLIP, ``make_captions_by_git.py``:
GIT): their common options, loading a captioner from a local folder or a Hub id with one-line errors, the
picklable image preprocessing, and captioning the images batch by batch
(:func:`finetune.image_batches.caption_with`, one caption file per image). Each script keeps its own
options, model loading and generation.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.image_batches import (
    RunStats,
    add_overwrite_argument,
    caption_with,
    check_positive,
    check_workers,
)
from library.errors import UserError


def caption_parser(description: str, add_own_arguments: Callable[[argparse.ArgumentParser], None]
                   ) -> argparse.ArgumentParser:
    """The options of a captioning script: the image folder, ``--caption_extension``, ``--batch_size`` and
    ``--max_data_loader_n_workers``, then the script's own (``add_own_arguments``), then ``--debug``,
    ``--overwrite`` and ``--recursive``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("train_data_dir", help="folder of the images to caption")
    p.add_argument("--caption_extension", default=".caption", help="extension of the caption files (default .caption)")
    p.add_argument("--batch_size", type=int, default=1, help="images per generate call (default 1)")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="decode images in this many worker processes (default: in the main process)")
    add_own_arguments(p)
    p.add_argument("--debug", action="store_true", help="print each image path and its caption")
    add_overwrite_argument(p)
    p.add_argument("--recursive", action="store_true", help="also caption the images in sub-folders")
    return p


def check_batch_options(args: argparse.Namespace) -> None:
    """UserError for a ``--batch_size`` below 1 or a bad ``--max_data_loader_n_workers``."""
    check_positive(args.batch_size, "--batch_size")
    check_workers(args.max_data_loader_n_workers)


def caption_device() -> torch.device:
    """The device the captioner runs on: the first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pretrained(option: str, name: str, model_name: str, device: torch.device,
                    load: Callable[[str], tuple[Any, Any]]) -> tuple[Any, Any]:
    """``(processor, model)`` from ``load(name)`` (a local folder saved with ``save_pretrained`` or a Hub id),
    the model in eval mode on ``device``.

    Every failure is a one-line UserError naming ``option`` (``--caption_weights``, ``--model_id``): a file
    instead of a folder, a folder that is not a transformers ``model_name`` captioner, a Hub id that cannot
    be fetched. ``load`` may raise its own UserError.
    """
    local = os.path.isdir(name)
    if not local and os.path.exists(name):
        raise UserError(f"{option} {name!r} is a file; pass a folder saved with save_pretrained "
                        "(config.json, model weights and the processor files) or a Hub id")
    try:
        processor, model = load(name)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise UserError(f"{option} {name!r}: not a transformers {model_name} captioning folder "
                            f"({reason[:200]})") from exc
        raise UserError(f"cannot load {model_name} model {name!r} from the Hugging Face Hub (offline or unreachable "
                        f"and not in the local cache, or no such repository): point {option} at a local folder "
                        "saved with save_pretrained") from exc
    return processor, model.to(device).eval()


class ProcessorPreprocess:
    """Picklable image -> ``(3, H, W)`` float32 pixel values with a transformers image processor's resize,
    crop and normalisation (for the loader workers)."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Resize, scale to [0, 1] and normalise one RGB uint8 image as the processor does."""
        return self.image_processor(images=image, return_tensors="np")["pixel_values"][0].astype(np.float32)


def caption_batches(captioner: Any, args: argparse.Namespace, paths: list[Path], extension: str) -> RunStats:
    """Caption ``paths`` with a loaded ``captioner`` (``preprocess()`` and ``caption(pixels)``), ``--batch_size``
    images at a time, decoded in ``--max_data_loader_n_workers`` workers, and write the caption files."""
    return caption_with(captioner, paths, extension, batch_size=args.batch_size,
                        workers=check_workers(args.max_data_loader_n_workers), debug=args.debug)

