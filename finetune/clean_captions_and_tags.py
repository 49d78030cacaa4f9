"""Clean the captions and tags of a fine-tuning metadata json (unify person words, drop rating and
redundant tags, replace underscores).

    python finetune/clean_captions_and_tags.py meta_cap_dd.json meta_clean.json

Every entry's ``caption`` and ``tags`` are cleaned (finetune/cleaning.py lists the rules); entries
lacking one are reported and that field is left absent. The old three-argument form
``<train_data_dir> <in_json> <out_json>`` is accepted with a warning (the folder is not needed).
Cleaning is idempotent: cleaning a cleaned file gives the same file. See docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.cleaning import clean_caption, clean_tags  # noqa: E402
from finetune.metadata import Metadata, read_metadata, summarize_paths, write_metadata  # noqa: E402
from library.cli import run_main  # noqa: E402

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options: ``in_json out_json`` (or the legacy ``train_data_dir in_json out_json``)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                usage="%(prog)s [-h] [--debug] in_json out_json")
    p.add_argument("in_json", help="metadata json to clean")
    p.add_argument("out_json", help="cleaned metadata json to write (may be in_json itself)")
    p.add_argument("legacy_out_json", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="print every change as FROM:/TO: pairs")
    return p


def clean_metadata(metadata: Metadata, debug: bool = False) -> tuple[int, list[str], list[str]]:
    """Clean every caption and tag string in place; returns ``(changed fields, keys without tags,
    keys without caption)``."""
    changed = 0
    no_tags: list[str] = []
    no_caption: list[str] = []
    for key, entry in metadata.items():
        for field, cleaner, missing in (("tags", lambda t: clean_tags(t, key), no_tags),
                                        ("caption", clean_caption, no_caption)):
            value = entry.get(field)
            if not isinstance(value, str):
                missing.append(key)
                continue
            cleaned = cleaner(value)
            if cleaned != value:
                changed += 1
                if debug:
                    print(f"{key} {field}\nFROM: {value}\nTO:   {cleaned}")
            entry[field] = cleaned
    return changed, no_tags, no_caption


def main(argv: Sequence[str] | None = None) -> int:
    """Read ``in_json``, clean it, write ``out_json`` atomically."""
    args = build_parser().parse_args(argv)
    in_json, out_json = args.in_json, args.out_json
    if args.legacy_out_json is not None:
        logger.warning("the train_data_dir argument (%s) is no longer needed and is ignored; "
                       "call: clean_captions_and_tags.py in_json out_json", in_json)
        in_json, out_json = out_json, args.legacy_out_json
    metadata = read_metadata(in_json)
    changed, no_tags, no_caption = clean_metadata(metadata, args.debug)
    if no_tags:
        logger.warning("%d entr%s without tags (left as they are): %s", len(no_tags),
                       "y" if len(no_tags) == 1 else "ies", summarize_paths(no_tags))
    if no_caption:
        logger.warning("%d entr%s without caption (left as they are): %s", len(no_caption),
                       "y" if len(no_caption) == 1 else "ies", summarize_paths(no_caption))
    logger.info("cleaned %d entries: %d caption/tag string(s) changed", len(metadata), changed)
    write_metadata(out_json, metadata)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
