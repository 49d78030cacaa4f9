"""Start-up cost of a 20,000-image dataset: image list, header sizes, captions, buckets (no latents).

    python bench/dataset_start.py [--dir /tmp/sdtrain_bench_20k] [--count 20000]

Measures ``build_dataset_group`` (what every training script does before its first step) on a
DreamBooth-style config with caption files and bucketing at 512 px:
  1. in this process, with an empty size index (every header read, in parallel),
  2. in this process again (the persisted size index answers),
  3. from launch: a fresh ``python`` process including its imports (torch, ...), empty index,
  4. from launch with the index.
The reference (kohya-ss/sd-scripts on this machine): about 1.3 s in-process with a warm page cache and
about 5 s from launch including imports. Images come from bench/dataset_scan.py's generator.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CHILD = """
import time, sys
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
import argparse
from library.config import load_dataset_blueprint
from library.data.dataset import build_dataset_group
from library.dataset_debug import build_parser
from library.option_groups import Options
args = build_parser("bench", support_dreambooth=True, support_caption=True,
                    support_caption_dropout=True).parse_args([])
opts = Options.from_args(args)
group = build_dataset_group(load_dataset_blueprint(opts.data, opts.validation, {config!r}, given=opts.given), seed=0)
print(len(group), group.num_images, time.perf_counter() - t0)
"""


def write_config(folder: Path, images: Path) -> Path:
    """A one-subset DreamBooth config with .txt captions and buckets at 512."""
    config = folder / "bench.toml"
    config.write_text(f"""[general]
enable_bucket = true
caption_extension = '.txt'
[[datasets]]
resolution = 512
batch_size = 4
  [[datasets.subsets]]
  image_dir = '{images}'
  num_repeats = 1
""", encoding="utf-8")
    return config


def in_process(config: Path) -> tuple[float, int]:
    """Seconds for one build_dataset_group in this process, and the batch count."""
    from library.config import load_dataset_blueprint
    from library.data.dataset import build_dataset_group
    from library.dataset_debug import build_parser
    from library.option_groups import Options

    args = build_parser("bench", support_dreambooth=True, support_caption=True,
                        support_caption_dropout=True).parse_args([])
    opts = Options.from_args(args)
    start = time.perf_counter()
    group = build_dataset_group(load_dataset_blueprint(opts.data, opts.validation, config, given=opts.given), seed=0)
    return time.perf_counter() - start, len(group)


def from_launch(config: Path, cache: Path) -> float:
    """Wall seconds of a fresh interpreter that imports everything and builds the dataset."""
    import os

    env = dict(os.environ, SDTRAIN_CACHE_DIR=str(cache))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), config=str(config))], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    """Generate the images if needed and print the four timings."""
    import logging
    import os

    from dataset_scan import generate

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dir", default="/tmp/sdtrain_bench_20k")
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    images = Path(args.dir)
    generate(images, args.count)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        config = write_config(tmp_path, images)
        os.environ["SDTRAIN_CACHE_DIR"] = str(tmp_path / "cache_inproc")
        cold, batches = in_process(config)
        warm, _ = in_process(config)
        launch_cold = from_launch(config, tmp_path / "cache_launch")
        launch_warm = from_launch(config, tmp_path / "cache_launch")
    print(f"{args.count} images, {batches} batches of 4 (page cache warm)")
    print(f"in-process, empty size index : {cold:6.2f} s   (reference ~1.3 s)")
    print(f"in-process, size index       : {warm:6.2f} s")
    print(f"from launch, empty size index: {launch_cold:6.2f} s   (reference ~5 s; includes imports)")
    print(f"from launch, size index      : {launch_warm:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
