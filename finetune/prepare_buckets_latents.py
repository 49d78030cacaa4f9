"""Bucket the training images by aspect ratio and pre-compute their VAE latents for fine_tune.py.

    python finetune/prepare_buckets_latents.py --full_path train_data meta_clean.json meta_lat.json \\
        model.safetensors --batch_size 4 --max_resolution 512,512 --mixed_precision no

For every image of ``train_data_dir``: choose its bucket exactly as training does, encode the
centre-cropped bucket image with the model's VAE into ``.npz`` (``_flip.npz`` too with ``--flip_aug``),
and write ``train_resolution`` into the metadata read from ``in_json``; the result goes to ``out_json``
(other fields and entries are kept). Unreadable images are reported and left out. See
docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names and defaults, plus --seed)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("train_data_dir", help="folder of the training images")
    p.add_argument("in_json", help="metadata json to read (from the merge/clean steps); must exist")
    p.add_argument("out_json", help="metadata json to write, with train_resolution (may equal in_json)")
    p.add_argument("model_name_or_path",
                   help="model whose VAE encodes the images: ldm .ckpt/.safetensors, VAE file, diffusers folder")
    p.add_argument("--v2", action="store_true", help="accepted for compatibility (the VAE type is read from the file)")
    p.add_argument("--batch_size", type=int, default=1, help="images per VAE call (one bucket per batch; default 1)")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="worker processes that decode and resize images (0: in the main process; "
                        "default: CPU count minus one, at most 8)")
    p.add_argument("--max_resolution", default="512,512",
                   help="training resolution 'width,height' (its area bounds the buckets; default 512,512)")
    p.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    p.add_argument("--bucket_reso_steps", type=int, default=64,
                   help="bucket size granularity, a multiple of 8 (default 64)")
    p.add_argument("--bucket_no_upscale", action="store_true",
                   help="one bucket per image size without enlarging small images (min/max bucket sizes ignored)")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="VAE precision (default no = float32)")
    p.add_argument("--full_path", action="store_true",
                   help="key images by their path and write latents beside them (else keys are file stems)")
    p.add_argument("--flip_aug", action="store_true", help="also encode the mirrored image (<name>_flip.npz)")
    p.add_argument("--skip_existing", action="store_true",
                   help="keep latent files that are already valid for the image's bucket")
    p.add_argument("--recursive", action="store_true", help="also read sub-folders")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the latent sampling noise (per image, so results do not depend on batching)")
    return p


def check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Validate the numeric options; returns ``--max_resolution`` as (width, height)."""
    from library.config.arguments import parse_resolution_option

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise UserError(f"--max_data_loader_n_workers must be 0 or more, got {args.max_data_loader_n_workers}")
    resolution = parse_resolution_option(args.max_resolution, "--max_resolution")
    assert resolution is not None
    return resolution


def prepare(args: argparse.Namespace, progress: bool = True):
    """Run the whole job for parsed ``args``; returns a :class:`finetune.latent_prep.PrepareResult`."""
    from finetune import latent_prep
    from finetune.metadata import list_dataset_images, read_metadata, write_metadata

    resolution = check_args(args)
    settings = latent_prep.bucket_settings(resolution, args.min_bucket_reso, args.max_bucket_reso,
                                           args.bucket_reso_steps, args.bucket_no_upscale)
    metadata = read_metadata(args.in_json)
    if args.recursive and not args.full_path:
        logger.warning("--recursive without --full_path: latents of sub-folder images go to %s/<stem>.npz",
                       args.train_data_dir)
    images = list_dataset_images(args.train_data_dir, args.recursive)
    planned, failed = latent_prep.plan_images(images, settings, args.train_data_dir, args.full_path)
    result = latent_prep.PrepareResult(failed=failed)
    if planned:
        import torch

        dtype = latent_prep.PRECISION_DTYPES[args.mixed_precision]
        started = time.perf_counter()
        vae = latent_prep.load_vae_for_latents(args.model_name_or_path, dtype)
        vae.to("cuda" if torch.cuda.is_available() else "cpu")
        vae.requires_grad_(False)
        logger.info("loaded the VAE of %s in %.1fs", args.model_name_or_path, time.perf_counter() - started)
        result.stats = latent_prep.encode_planned(
            planned, vae, batch_size=args.batch_size, workers=args.max_data_loader_n_workers,
            flip_aug=args.flip_aug, skip_existing=args.skip_existing, seed=args.seed, progress=progress)
        logger.info("%s", result.stats.summary())
    decode_failed = {path for path, _ in result.stats.failed}
    result.failed.extend(result.stats.failed)
    result.done = [item for item in planned if item.image_path not in decode_failed]
    latent_prep.report_failures(result.failed)
    latent_prep.update_metadata(metadata, result.done)
    result.report = latent_prep.bucket_report(settings, result.done)
    for line in result.report:
        logger.info("%s", line)
    write_metadata(args.out_json, metadata)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Bucket, encode, and write the metadata with train_resolution."""
    prepare(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
