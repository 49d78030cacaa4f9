"""Caption every image of a folder with BLIP and write ``<image name><caption_extension>`` beside it.

    python finetune/make_captions.py --batch_size 8 train_data
    python finetune/make_captions.py --caption_weights blip_large_folder --beam_search --num_beams 3 train_data

The model is a transformers BLIP captioner (``BlipForConditionalGeneration`` with its ``BlipProcessor``):
a Hub id (default ``Salesforce/blip-image-captioning-large``, the transformers conversion of the
reference's ``model_large_caption.pth``) or a local folder written with ``save_pretrained``. Every
caption is generated after the prompt "a picture of", as in the reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetune.image_batches import (  # noqa: E402
    RunStats,
    add_overwrite_argument,
    caption_folder,
    caption_with,
    check_positive,
    check_workers,
    output_extension,
)
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_WEIGHTS = "Salesforce/blip-image-captioning-large"
PROMPT = "a picture of"
SAMPLING_REPETITION_PENALTY = 1.1  # fixed in the reference


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names and defaults)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("train_data_dir", help="folder of the images to caption")
    p.add_argument("--caption_weights", default=DEFAULT_CAPTION_WEIGHTS,
                   help="transformers BLIP captioning model: a local folder saved with save_pretrained (model and "
                        f"processor) or a Hugging Face Hub id (default {DEFAULT_CAPTION_WEIGHTS})")
    p.add_argument("--caption_extension", default=".caption", help="extension of the caption files (default .caption)")
    p.add_argument("--caption_extention", default=None,
                   help="misspelled legacy alias of --caption_extension; overrides it when given")
    p.add_argument("--beam_search", action="store_true",
                   help="beam search (deterministic) instead of nucleus sampling")
    p.add_argument("--batch_size", type=int, default=1, help="images per generate call (default 1)")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="decode images in this many worker processes (default: in the main process)")
    p.add_argument("--num_beams", type=int, default=1, help="beams for --beam_search (1 = greedy; default 1)")
    p.add_argument("--top_p", type=float, default=0.9, help="top-p of nucleus sampling (default 0.9)")
    p.add_argument("--max_length", type=int, default=75,
                   help="maximum caption length in tokens, counting the 4 prompt tokens (default 75)")
    p.add_argument("--min_length", type=int, default=5,
                   help="minimum caption length in tokens, counting the 4 prompt tokens (default 5)")
    p.add_argument("--seed", type=int, default=42,
                   help="random seed: the same seed, file list and batch size give the same captions (default 42)")
    p.add_argument("--debug", action="store_true", help="print each image path and its caption")
    add_overwrite_argument(p)
    p.add_argument("--recursive", action="store_true", help="also caption the images in sub-folders")
    return p


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices) once, before the first caption."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _is_reference_checkpoint(weights: str) -> bool:
    """True for what the reference accepted but transformers cannot load: a URL or a .pth/.pt file."""
    return weights.startswith(("http://", "https://")) or (
        os.path.isfile(weights) and weights.lower().endswith((".pth", ".pt", ".ckpt")))


def load_blip(weights: str, device: torch.device):
    """``(processor, model)`` from a local folder or a Hub id; the model in eval mode on ``device``.

    Every failure is a one-line UserError naming ``--caption_weights``.
    """
    from transformers import BlipForConditionalGeneration, BlipProcessor

    if _is_reference_checkpoint(weights):
        raise UserError(f"--caption_weights {weights!r}: checkpoints of the original BLIP code are not supported; "
                        "pass a transformers BLIP folder (saved with save_pretrained) or a Hub id such as "
                        f"{DEFAULT_CAPTION_WEIGHTS}")
    local = os.path.isdir(weights)
    if not local and os.path.exists(weights):
        raise UserError(f"--caption_weights {weights!r} is a file; pass a folder saved with save_pretrained "
                        "(config.json, model weights and the processor files) or a Hub id")
    try:
        processor = BlipProcessor.from_pretrained(weights)
        model = BlipForConditionalGeneration.from_pretrained(weights)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise UserError(f"--caption_weights {weights!r}: not a transformers BLIP captioning folder "
                            f"({reason[:200]})") from exc
        raise UserError(f"cannot load BLIP model {weights!r} from the Hugging Face Hub (offline or unreachable and "
                        "not in the local cache, or no such repository): point --caption_weights at a local folder "
                        "saved with save_pretrained") from exc
    return processor, model.to(device).eval()


def prompt_ids(processor, batch: int) -> torch.Tensor:
    """Token ids of the prompt for ``batch`` images: ``[CLS] a picture of [SEP]``.

    ``BlipForConditionalGeneration.generate`` swaps the first id for the decoder's BOS (``[DEC]``) and
    drops the last, so generation starts from the reference's 4 prompt tokens.
    """
    return processor.tokenizer([PROMPT] * batch, return_tensors="pt").input_ids


def generation_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``generate`` for beam search or nucleus sampling (reference settings)."""
    options: dict = {"max_length": args.max_length, "min_length": args.min_length}
    if args.beam_search:
        options.update(num_beams=args.num_beams, repetition_penalty=1.0, do_sample=False)
    else:
        options.update(do_sample=True, top_p=args.top_p, repetition_penalty=SAMPLING_REPETITION_PENALTY,
                       num_beams=1)
    return options


class BlipPreprocess:
    """Picklable image -> ``(3, H, W)`` float32 pixel values with the processor's resize and normalisation."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Resize (bicubic, aspect ignored), scale to [0, 1] and normalise one RGB uint8 image."""
        return self.image_processor(images=image, return_tensors="np")["pixel_values"][0].astype(np.float32)


def check_options(args: argparse.Namespace) -> None:
    """UserError for option values generate() would reject or silently misuse."""
    check_positive(args.batch_size, "--batch_size")
    check_positive(args.num_beams, "--num_beams")
    check_workers(args.max_data_loader_n_workers)
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.min_length < 0 or args.min_length > args.max_length:
        raise UserError(f"--min_length must be between 0 and --max_length ({args.max_length}), got {args.min_length}")


class Captioner:
    """A loaded BLIP model with its processor and generation settings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.processor, self.model = load_blip(args.caption_weights, self.device)
        self.prompt_length = prompt_ids(self.processor, 1).shape[1] - 1  # [DEC] a picture of
        if args.max_length <= self.prompt_length:
            raise UserError(f"--max_length must be more than the {self.prompt_length} prompt tokens, "
                            f"got {args.max_length}")
        positions = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if positions is not None and args.max_length > positions:
            raise UserError(f"--max_length {args.max_length} is longer than the {positions} positions of the "
                            "BLIP text decoder")
        self.options = generation_options(args)

    def preprocess(self) -> BlipPreprocess:
        """The picklable per-image preprocessing for the loader workers."""
        return BlipPreprocess(self.processor.image_processor)

    def caption(self, pixels: torch.Tensor) -> list[str]:
        """Captions of a ``[N, 3, H, W]`` batch, without the prompt."""
        with torch.no_grad():
            ids = prompt_ids(self.processor, len(pixels)).to(self.device)
            generated = self.model.generate(pixel_values=pixels.to(self.device), input_ids=ids, **self.options)
        texts = self.processor.batch_decode(generated[:, self.prompt_length:].cpu(), skip_special_tokens=True)
        return [text.strip() for text in texts]


def caption_images(args: argparse.Namespace, paths: list[Path], extension: str) -> RunStats:
    """Load the model, caption ``paths`` batch by batch and write the caption files."""
    captioner = Captioner(args)
    workers = check_workers(args.max_data_loader_n_workers)
    seed_everything(args.seed)  # after loading, so nothing the loading draws can shift the captions
    return caption_with(captioner, paths, extension, batch_size=args.batch_size, workers=workers, debug=args.debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Caption the images of ``train_data_dir``; unreadable images are reported and skipped."""
    args = build_parser().parse_args(argv)
    check_options(args)
    extension = output_extension(args.caption_extension, args.caption_extention)
    return caption_folder(args, extension, caption_images)


if __name__ == "__main__":
    sys.exit(run_main(main))
