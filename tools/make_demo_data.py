"""Prepare the demo: a tiny random SD1 model, a small generated image set with captions, and its TOML.

    python tools/make_demo_data.py demo_output
    → demo_output/models/tiny-sd1.safetensors, demo_output/images/*.png + .txt, demo_output/dataset.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}


def draw_images(folder: Path, size: int = 96) -> int:
    """One image per colour and shape (with a caption file each); returns how many."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            image = Image.new("RGB", (size, size), (245, 245, 240))
            draw = ImageDraw.Draw(image)
            box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
            if shape == "circle":
                draw.ellipse(box, fill=rgb)
            elif shape == "square":
                draw.rectangle(box, fill=rgb)
            else:
                draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=rgb)
            stem = f"{colour}_{shape}"
            image.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(f"zkz toy, a {colour} {shape}", encoding="utf-8")
            count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """Write the demo model, images and dataset config."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("output_dir", help="folder for the demo files")
    args = parser.parse_args(argv)
    out = Path(args.output_dir).resolve()
    from tools.make_tiny_model import main as make_model

    model = out / "models" / "tiny-sd1.safetensors"
    if not model.exists():
        make_model([str(out / "models"), "--preset", "tiny-sd1", "--formats", "safetensors", "--seed", "0"])
    count = draw_images(out / "images")
    config = out / "dataset.toml"
    config.write_text(f"""# Demo dataset: {count} generated images with caption files (.txt), 64 px, 4 repeats.
[general]
caption_extension = '.txt'
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{out / "images"}'
  num_repeats = 4
""", encoding="utf-8")
    print(f"demo model: {model}\ndemo images: {out / 'images'} ({count})\ndataset config: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
