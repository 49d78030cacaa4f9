"""Caption every image of a folder with Microsoft GIT and write ``<image name><caption_extension>`` beside it.

    python finetune/make_captions_by_git.py --batch_size 8 train_data
    python finetune/make_captions_by_git.py --model_id models/git-large-textcaps --remove_words train_data

The model is a transformers GIT captioner (``GitForCausalLM`` with its processor): a Hub id (default
``microsoft/git-large-textcaps``, as in the reference) or a local folder written with ``save_pretrained``.
Captions are generated greedily (the model's generation settings), at most ``--max_length`` tokens.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from finetune import captioning  # noqa: E402
from finetune.image_batches import RunStats, caption_folder, output_extension  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "microsoft/git-large-textcaps"

# What --remove_words deletes, in this order: GIT trained on TextCaps likes to invent the text written in
# the picture ("a sign that says 'open'"), which is mostly wrong and teaches the model nothing useful.
_QUOTED_OR_WORD = r'(?:" ?[^"]*"|\w+)'
REMOVED_PHRASES = [
    re.compile(r"(?:has|with|and) the (?:words?|letters?|name) " + _QUOTED_OR_WORD
               + r"(?: ?(?:is )?(?:on|in) (?:the |her |their |him )?\w+)?"),
    re.compile(r"(?:with a sign )?that says ?" + _QUOTED_OR_WORD + r"(?: ?on it)?"),
    re.compile(r"(?:with a sign )?that says ?(?:' ?(?:i'm)?[^']*'|\w+)(?: ?on it)?"),
    re.compile(r"with the number \d+ on (?:it|\w+ \w+)"),
    re.compile(r'with the words "'),
    re.compile(r"word \w+ on it"),
    re.compile(r"that says the word \w+ on it"),
    re.compile(r"that says'the word \"(?: on it)?"),
]


def remove_words(caption: str) -> str:
    """``caption`` without the "that says ..." / "with the word ..." phrases, runs of spaces made one and
    the ends stripped."""
    for pattern in REMOVED_PHRASES:
        caption = pattern.sub("", caption)
    return " ".join(caption.split())


def _add_git_arguments(p: argparse.ArgumentParser) -> None:
    """The options of this script beyond :func:`finetune.captioning.caption_parser`'s."""
    p.add_argument("--model_id", default=DEFAULT_MODEL_ID,
                   help="transformers GIT model: a local folder saved with save_pretrained (model and processor) "
                        f"or a Hugging Face Hub id (default {DEFAULT_MODEL_ID})")
    p.add_argument("--max_length", type=int, default=50,
                   help="maximum caption length in tokens, counting the start token (default 50)")
    p.add_argument("--remove_words", action="store_true",
                   help='remove phrases such as "with the words xxx" or "that says xxx" from the captions')


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names and defaults)."""
    return captioning.caption_parser(__doc__.strip().splitlines()[0], _add_git_arguments)


def load_git(model_id: str, device: torch.device):
    """``(processor, model)`` from a local folder or a Hub id; the model in eval mode on ``device``.

    Every failure is a one-line UserError naming ``--model_id``.
    """
    from transformers import AutoConfig, AutoProcessor, GitForCausalLM

    def load(name: str):
        config = AutoConfig.from_pretrained(name)
        if config.model_type != "git":
            raise UserError(f"--model_id {name!r} is a {config.model_type!r} model, not a GIT captioner")
        processor = AutoProcessor.from_pretrained(name)
        if not hasattr(processor, "image_processor") or not hasattr(processor, "batch_decode"):
            raise UserError(f"--model_id {name!r}: its processor has no image processor and tokenizer")
        return processor, GitForCausalLM.from_pretrained(name)

    return captioning.load_pretrained("--model_id", model_id, "GIT", device, load)


class GitCaptioner:
    """A loaded GIT model with its processor and the generation length."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = captioning.caption_device()
        self.processor, self.model = load_git(args.model_id, self.device)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and args.max_length > positions:
            raise UserError(f"--max_length {args.max_length} is longer than the {positions} text positions of "
                            "the GIT model")
        self.max_length = args.max_length
        self.remove_words = args.remove_words

    def preprocess(self) -> captioning.ProcessorPreprocess:
        """The picklable per-image preprocessing (the processor's resize, crop and normalisation)."""
        return captioning.ProcessorPreprocess(self.processor.image_processor)

    def caption(self, pixels: torch.Tensor) -> list[str]:
        """Captions of a ``[N, 3, H, W]`` batch (``--remove_words`` applied when asked)."""
        with torch.no_grad():
            generated = self.model.generate(pixel_values=pixels.to(self.device), max_length=self.max_length)
        texts = [text.strip() for text in self.processor.batch_decode(generated.cpu(), skip_special_tokens=True)]
        return [remove_words(text) for text in texts] if self.remove_words else texts


def caption_images(args: argparse.Namespace, paths: list[Path], extension: str) -> RunStats:
    """Load the model, caption ``paths`` batch by batch and write the caption files."""
    return captioning.caption_batches(GitCaptioner(args), args, paths, extension)


def main(argv: Sequence[str] | None = None) -> int:
    """Caption the images of ``train_data_dir``; unreadable images are reported and skipped."""
    args = build_parser().parse_args(argv)
    captioning.check_batch_options(args)
    if args.max_length < 2:
        raise UserError(f"--max_length must be at least 2 (the start token and one word), got {args.max_length}")
    extension = output_extension(args.caption_extension, None)
    return caption_folder(args, extension, caption_images)


if __name__ == "__main__":
    sys.exit(run_main(main))
