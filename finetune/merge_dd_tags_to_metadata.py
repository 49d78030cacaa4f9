"""Merge tag files (``<image>.txt`` from a tagger) into the fine-tuning metadata json.

    python finetune/merge_dd_tags_to_metadata.py --full_path train_data --in_json meta_cap.json meta_cap_dd.json

Every image's tag file (whole content, stripped, tags left as the tagger wrote them) becomes the ``tags``
of its entry; other fields and other entries are kept. Without ``--in_json`` an existing ``out_json`` is
read and updated. Images without a tag file are reported and left as they were. See
docs/preprocessing.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.merge_text import build_merge_parser, run_merge  # noqa: E402
from library.cli import run_main  # noqa: E402


def build_parser():
    """Command-line options (the reference's names; no legacy extension alias here)."""
    return build_merge_parser(__doc__.strip().splitlines()[0], "tag", ".txt", legacy_alias=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Merge the tags of ``train_data_dir`` into ``out_json``."""
    args = build_parser().parse_args(argv)
    return run_merge(args, "tags", "tag")


if __name__ == "__main__":
    sys.exit(run_main(main))
