"""Print the metadata (``__metadata__``) of a .safetensors file: LoRA training options, hashes, modelspec.

    python tools/show_metadata.py --model my_lora.safetensors             # sorted, pretty JSON
    python tools/show_metadata.py --model my_lora.safetensors --readable  # one option per line

Only the file's header is read, so this is instant even for multi-GB checkpoints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

MAX_HEADER_BYTES = 100 * 1024 * 1024
TIME_KEYS = ("ss_training_started_at", "ss_training_finished_at")


def setup_parser() -> argparse.ArgumentParser:
    """Command-line options (``--model`` as in the reference; the file may also be given positionally)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default=None, help=".safetensors file to read")
    p.add_argument("file", nargs="?", default=None, help="the same as --model")
    p.add_argument("--readable", action="store_true",
                   help="print one 'key: value' line per entry, with JSON values and timestamps decoded")
    return p


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (UserError naming the file when it is not one)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file" if not path.exists() else f"{path}: is a folder, not a file")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is not a .safetensors file (too short)")
        size = int.from_bytes(head, "little")
        if size < 2 or size > MAX_HEADER_BYTES:
            raise UserError(f"{path} is not a .safetensors file ({_what_it_is(head)})")
        raw = f.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a .safetensors file (its header is not a JSON object)")
    return header


def _what_it_is(head: bytes) -> str:
    if head.startswith(b"PK"):
        return "it is a zip file, e.g. a torch .ckpt/.pt pickle, which carries no metadata"
    if head[:1] == b"\x80":
        return "it is a Python pickle (old torch format), which carries no metadata"
    return "no valid header length"


def _decoded(value: str) -> Any:
    """A JSON object/array value decoded, else the string."""
    text = value.strip()
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    return value


def readable_lines(metadata: dict[str, str]) -> list[str]:
    """``key: value`` lines, sorted: JSON values compact, Unix times with their UTC date."""
    lines = []
    for key in sorted(metadata):
        value = metadata[key]
        shown: Any = _decoded(value)
        if key in TIME_KEYS:
            try:
                when = datetime.datetime.fromtimestamp(float(value), tz=datetime.timezone.utc)
                shown = f"{value} ({when:%Y-%m-%d %H:%M:%S} UTC)"
            except (ValueError, OverflowError, OSError):
                pass
        if not isinstance(shown, str):
            shown = json.dumps(shown, ensure_ascii=False, sort_keys=True)
        lines.append(f"{key}: {shown}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the metadata; exit 2 with one line for a file that is not .safetensors."""
    args = setup_parser().parse_args(argv)
    name = args.model or args.file
    if not name:
        raise UserError("--model is required: the .safetensors file to read")
    path = Path(name)
    header = read_safetensors_header(path)
    metadata = header.get("__metadata__")
    if not metadata:
        print(f"No metadata found in {path} ({len(header) - ('__metadata__' in header)} tensors)", file=sys.stderr)
        return 0
    if args.readable:
        print(f"{path}: {len(header) - 1} tensors, {len(metadata)} metadata entries")
        print("\n".join(readable_lines(metadata)))
    else:
        print(json.dumps(metadata, indent=4, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
