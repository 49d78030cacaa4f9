"""Image and cache options of later sd-scripts (kohya names and defaults) and their combination checks.

``--resize_interpolation`` and ``--cache_info`` are the command-line fallbacks of the dataset-config keys of
the same names (library/config/keys.py; the resizing is library/data/images.py ``resize_image``, the info
cache library/data/info_cache.py). ``--skip_cache_check`` and ``--highvram`` change latent caching
(library/data/latents.py), ``--dataset_class`` replaces the dataset config with a user class
(library/data/user_dataset.py). docs/datasets.md and docs/train_network.md.
"""

from __future__ import annotations

import argparse

from library.data.images import INTERPOLATIONS

# config keys whose command-line option has the same name (taken as-is as the cascade's last fallback)
IMAGE_OPTION_KEYS = ("resize_interpolation", "cache_info")


def add_image_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Register --resize_interpolation, --cache_info, --skip_cache_check, --dataset_class and --highvram."""
    add = parser.add_argument
    add("--resize_interpolation", type=str, default=None, choices=list(INTERPOLATIONS),
        help="how images are resized to their bucket: lanczos, nearest, bilinear (= linear), bicubic (= cubic), "
             "area, box (default: area when shrinking, lanczos when enlarging)")
    add("--cache_info", action="store_true",
        help="keep image sizes and captions of DreamBooth-style folders in <folder>/metadata_cache.json and "
             "read them from there at the next start")
    add("--skip_cache_check", action="store_true",
        help="with --cache_latents_to_disk: use existing .npz latent files without checking that they are "
             "current (missing files are still made)")
    add("--dataset_class", type=str, default=None, metavar="PACKAGE.MODULE.CLASS",
        help="a user dataset class that makes the batches, instead of the dataset config (docs/datasets.md)")
    add("--highvram", action="store_true",
        help="do not release cached GPU memory after every VAE batch while caching latents (faster with "
             "plenty of VRAM)")


def image_cache_problems(args: argparse.Namespace) -> list[str]:
    """Option combinations that cannot work with ``--dataset_class`` (its batches come ready-made)."""
    if not getattr(args, "dataset_class", None):
        return []
    problems = []
    if "." not in args.dataset_class.strip(".") or not all(args.dataset_class.split(".")):
        problems.append(f"--dataset_class must be 'package.module.Class', got '{args.dataset_class}'")
    needs_images = [("--cache_latents", getattr(args, "cache_latents", False)),
                    ("--cache_latents_to_disk", getattr(args, "cache_latents_to_disk", False)),
                    ("--masked_loss", getattr(args, "masked_loss", False)),
                    ("--validation_split", bool(getattr(args, "validation_split", None))),
                    ("--debug_dataset", getattr(args, "debug_dataset", False)),
                    ("--dry_run", getattr(args, "dry_run", False) or bool(getattr(args, "dry_run_json", None)))]
    for option, given in needs_images:
        if given:
            problems.append(f"{option} cannot be used with --dataset_class (it needs the images of a dataset "
                            "config; a dataset class gives ready batches)")
    return problems
