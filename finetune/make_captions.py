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

from finetune import captioning  # noqa: E402
from finetune.image_batches import RunStats, caption_folder, check_positive, output_extension  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_WEIGHTS = "Salesforce/blip-image-captioning-large"
PROMPT = "a picture of"
SAMPLING_REPETITION_PENALTY = 1.1  # fixed in the reference


def _add_blip_arguments(p: argparse.ArgumentParser) -> None:
    """The options of this script beyond :func:`finetune.captioning.caption_parser`'s."""
    p.add_argument("--caption_weights", default=DEFAULT_CAPTION_WEIGHTS,
                   help="transformers BLIP captioning model: a local folder saved with save_pretrained (model and "
                        f"processor) or a Hugging Face Hub id (default {DEFAULT_CAPTION_WEIGHTS})")
    p.add_argument("--caption_extention", default=None,
                   help="misspelled legacy alias of --caption_extension; overrides it when given")
    p.add_argument("--beam_search", action="store_true",
                   help="beam search (deterministic) instead of nucleus sampling")
    p.add_argument("--num_beams", type=int, default=1, help="beams for --beam_search (1 = greedy; default 1)")
    p.add_argument("--top_p", type=float, default=0.9, help="top-p of nucleus sampling (default 0.9)")
    p.add_argument("--max_length", type=int, default=75,
                   help="maximum caption length in tokens, counting the 4 prompt tokens (default 75)")
    p.add_argument("--min_length", type=int, default=5,
                   help="minimum caption length in tokens, counting the 4 prompt tokens (default 5)")
    p.add_argument("--seed", type=int, default=42,
                   help="random seed: the same seed, file list and batch size give the same captions (default 42)")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names and defaults)."""
    return captioning.caption_parser(__doc__.strip().splitlines()[0], _add_blip_arguments)


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
    return captioning.load_pretrained("--caption_weights", weights, "BLIP", device, lambda name: (
        BlipProcessor.from_pretrained(name), BlipForConditionalGeneration.from_pretrained(name)))


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


def check_options(args: argparse.Namespace) -> None:
    """UserError for option values generate() would reject or silently misuse."""
    captioning.check_batch_options(args)
    check_positive(args.num_beams, "--num_beams")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.min_length < 0 or args.min_length > args.max_length:
        raise UserError(f"--min_length must be between 0 and --max_length ({args.max_length}), got {args.min_length}")


class Captioner:
    """A loaded BLIP model with its processor and generation settings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = captioning.caption_device()
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

    def preprocess(self) -> captioning.ProcessorPreprocess:
        """The picklable per-image preprocessing for the loader workers (resize: bicubic, aspect ignored)."""
        return captioning.ProcessorPreprocess(self.processor.image_processor)

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
    seed_everything(args.seed)  # after loading, so nothing the loading draws can shift the captions
    return captioning.caption_batches(captioner, args, paths, extension)


def main(argv: Sequence[str] | None = None) -> int:
    """Caption the images of ``train_data_dir``; unreadable images are reported and skipped."""
    args = build_parser().parse_args(argv)
    check_options(args)
    extension = output_extension(args.caption_extension, args.caption_extention)
    return caption_folder(args, extension, caption_images)


if __name__ == "__main__":
    sys.exit(run_main(main))
