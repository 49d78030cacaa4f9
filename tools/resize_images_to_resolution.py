"""Write down-scaled copies of a folder of training images at one or more pixel budgets.

    python tools/resize_images_to_resolution.py --max_resolution 512x512,384x384 \\
        --save_as_png --copy_associated_files src_images dst_images

For every image ``name.ext`` and every target ``WxH`` the destination gets ``name+WxH.jpg`` (or
``.png``): the original scaled down (never up) to at most W·H pixels, aspect ratio kept, then
centre-cropped so both sides are multiples of ``--divisible_by``. Each target is made from the
original. Other files are copied unchanged; with ``--copy_associated_files`` a caption ``name.txt``
is also copied as ``name+WxH.txt`` for each target. Originals are not copied.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("area", "cubic", "lanczos4")


@dataclass(frozen=True)
class Target:
    """One ``--max_resolution`` entry: its text as given (used in file names) and its pixel budget."""

    text: str
    pixels: int


def setup_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("src_img_folder", help="folder with the original images (only its top level is read)")
    p.add_argument("dst_img_folder", help="output folder (created if missing; must differ from the source)")
    p.add_argument("--max_resolution", type=str, default="512x512,384x384,256x256,128x128",
                   help="comma-separated WIDTHxHEIGHT pixel budgets (only the area W*H counts) "
                        "(default: 512x512,384x384,256x256,128x128)")
    p.add_argument("--save_as_png", action="store_true", help="save PNG (default: JPEG, quality 100)")
    p.add_argument("--copy_associated_files", action="store_true",
                   help="copy files with the image's name and another extension (captions…) under each new name")
    p.add_argument("--divisible_by", type=int, default=1,
                   help="centre-crop so that width and height are multiples of this (default 1)")
    p.add_argument("--interpolation", type=str, default="area", choices=INTERPOLATIONS,
                   help="OpenCV interpolation for shrinking (default area)")
    return p


def parse_targets(text: str) -> list[Target]:
    """Parse ``--max_resolution`` ("512x512, 384x384") into targets; raises UserError when malformed."""
    targets = []
    for part in text.split(","):
        entry = part.strip()
        width, sep, height = entry.partition("x")
        try:
            w, h = int(width), int(height)
        except ValueError:
            w = h = 0
        if not sep or w < 1 or h < 1:
            raise UserError(f"--max_resolution {text!r}: entry {entry!r} is not WIDTHxHEIGHT with positive "
                            "integers (e.g. 512x512,384x384)")
        targets.append(Target(entry, w * h))
    return targets


def target_size(width: int, height: int, max_pixels: int, divisible_by: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((scaled w, h), (cropped w, h))`` for one image and pixel budget.

    Images with more than ``max_pixels`` pixels are scaled by √(max/pixels) (sides floored), never
    enlarged; then each side is floored to a multiple of ``divisible_by`` (0 when the side is smaller).
    """
    scaled = (width, height)
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        scaled = (max(1, int(width * scale)), max(1, int(height * scale)))
    cropped = (scaled[0] - scaled[0] % divisible_by, scaled[1] - scaled[1] % divisible_by)
    return scaled, cropped


def resize_image(image, max_pixels: int, divisible_by: int, interpolation: str):
    """Scale an (H, W, 3) uint8 array down to the budget with OpenCV, then centre-crop (offset ⌊excess/2⌋).

    Returns None when a scaled side is smaller than ``divisible_by`` (nothing would be left).
    """
    import cv2

    height, width = image.shape[:2]
    (sw, sh), (cw, ch) = target_size(width, height, max_pixels, divisible_by)
    if cw == 0 or ch == 0:
        return None
    if (sw, sh) != (width, height):
        flag = {"area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "lanczos4": cv2.INTER_LANCZOS4}[interpolation]
        image = cv2.resize(image, (sw, sh), interpolation=flag)
    if (cw, ch) != (sw, sh):
        top, left = (sh - ch) // 2, (sw - cw) // 2
        image = image[top:top + ch, left:left + cw]
    return image


def save_image(image, path: Path, as_png: bool) -> None:
    """Write an RGB array atomically as PNG or JPEG (quality 100)."""
    from PIL import Image

    from library.fileio import atomic_path

    with atomic_path(path) as tmp:
        picture = Image.fromarray(image)
        if as_png:
            picture.save(tmp, format="PNG")
        else:
            picture.save(tmp, format="JPEG", quality=100)


def copy_file(src: Path, dst: Path) -> None:
    """Copy a file atomically (contents and times)."""
    from library.fileio import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)


def _check_folders(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise UserError(f"src_img_folder {src}: no such folder")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"dst_img_folder {dst}: exists and is not a folder")
    if dst.resolve() == src.resolve():
        raise UserError(f"dst_img_folder {dst} is the source folder; the copies would mix with the originals "
                        "(choose another folder)")


def main(argv: Sequence[str] | None = None) -> int:
    """Resize every image of the source folder to each target and copy the other files."""
    from tqdm import tqdm

    from library.data.images import ImageLoadError, is_image_file, load_image_rgb

    args = setup_parser().parse_args(argv)
    targets = parse_targets(args.max_resolution)
    if args.divisible_by < 1:
        raise UserError(f"--divisible_by {args.divisible_by}: must be at least 1")
    src, dst = Path(args.src_img_folder), Path(args.dst_img_folder)
    _check_folders(src, dst)
    dst.mkdir(parents=True, exist_ok=True)
    dst_resolved = dst.resolve()

    entries = sorted(src.iterdir())
    images = [p for p in entries if p.is_file() and is_image_file(p.name)]
    others = [p for p in entries if p.is_file() and not is_image_file(p.name)]
    for folder in (p for p in entries if p.is_dir() and p.resolve() != dst_resolved):
        logger.warning("skipping sub-folder %s (only the top level of the source folder is read)", folder)

    for path in others:
        copy_file(path, dst / path.name)
    suffix = ".png" if args.save_as_png else ".jpg"
    failed = 0
    seen_stems: dict[str, Path] = {}
    for path in tqdm(images, desc="resizing images", unit="img"):
        if path.stem in seen_stems:
            logger.warning("%s skipped: its copies would have the same names as those of %s", path.name,
                           seen_stems[path.stem].name)
            continue
        seen_stems[path.stem] = path
        try:
            original = load_image_rgb(path)
        except ImageLoadError as exc:
            logger.warning("%s; skipped", exc)
            failed += 1
            continue
        associated = [p for p in others if p.stem == path.stem] if args.copy_associated_files else []
        for target in targets:
            image = resize_image(original, target.pixels, args.divisible_by, args.interpolation)
            name = f"{path.stem}+{target.text}"
            if image is None:
                logger.warning("%s at %s: a side is smaller than --divisible_by %d; skipped", path.name,
                               target.text, args.divisible_by)
                continue
            save_image(image, dst / (name + suffix), args.save_as_png)
            verb = "Resized" if image.shape[:2] != original.shape[:2] else "Saved"
            print(f"{verb} image: {path.name} with size {image.shape[0]}x{image.shape[1]} as {name + suffix}")
            for extra in associated:
                copy_file(extra, dst / (name + extra.suffix))
    if failed:
        print(f"{failed} of {len(images)} images could not be read and were skipped")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
