"""Merge caption files (``<image>.caption``) into the fine-tuning metadata json.

    python finetune/merge_captions_to_metadata.py --full_path train_data meta_cap.json
    python finetune/merge_captions_to_metadata.py --full_path --in_json meta_cap1.json train_data2 meta_cap2.json

Every image's caption file (whole content, stripped) becomes the ``caption`` of its entry; other fields
and other entries are kept. Without ``--in_json`` an existing ``out_json`` is read and updated. Images
without a caption file are reported and left as they were. See docs/preprocessing.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.merge_text import build_merge_parser, run_merge  # noqa: E402
from library.cli import run_main  # noqa: E402


def build_parser():
    """Command-line options (the reference's names, including the legacy --caption_extention)."""
    return build_merge_parser(__doc__.strip().splitlines()[0], "caption", ".caption", legacy_alias=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Merge the captions of ``train_data_dir`` into ``out_json``."""
    args = build_parser().parse_args(argv)
    return run_merge(args, "caption", "caption")


if __name__ == "__main__":
    sys.exit(run_main(main))
