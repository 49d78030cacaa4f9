"""``--cache_latents`` / ``--cache_latents_to_disk`` for a whole dataset group."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from library.data.cache_names import latent_cache_paths
from library.data.latents import LatentRequest, cache_latents

logger = logging.getLogger(__name__)


def cache_group_latents(group: Any, vae: Any, *, to_disk: bool, batch_size: int = 1, workers: int | None = None,
                        seed: int = 0, skip_check: bool = False, high_vram: bool = False) -> None:
    """Encode every image of ``group`` once (centre crop of its bucket, plus the mirrored crop for subsets
    with flip_aug) and keep the latents in ``group.latents``; with ``to_disk`` also write/reuse the
    ``.npz`` files beside the images (``skip_check``: existing files are trusted, ``--skip_cache_check``).
    ``high_vram`` keeps cached accelerator memory between VAE batches (``--highvram``). Images that fail
    to load are left out of training."""
    keys: list[tuple[int, int]] = []
    requests: list[LatentRequest] = []
    cache_paths = latent_cache_paths(_images_to_cache(group)) if to_disk else {}
    for di, ds in enumerate(group.datasets):
        for ei, (entry, assignment) in enumerate(zip(ds.entries, ds.assignments)):
            if entry.path is None or group.uses_latents(di, ei):
                continue
            subset = ds.blueprint.subsets[entry.subset_index]
            path = Path(entry.path)
            requests.append(LatentRequest(image_path=path, bucket_reso=assignment.bucket,
                                          resized_size=assignment.resized_size, flip=subset.flip_aug,
                                          npz_path=cache_paths.get(path), interpolation=subset.resize_interpolation))
            keys.append((di, ei))
    if not requests:
        return
    results, stats = cache_latents(requests, vae, batch_size=batch_size, workers=workers, seed=seed,
                                   skip_check=skip_check, high_vram=high_vram)
    for key, result in zip(keys, results):
        if result is not None:
            group.latents[key] = result
        else:
            group.mark_failed(group.datasets[key[0]].entries[key[1]].key)
    logger.info("%s", stats.summary())
    if stats.failed:
        logger.warning("left out %d image(s) that could not be encoded: %s", len(stats.failed),
                       "; ".join(f"{p}: {why}" for p, why in stats.failed[:10]))


def _images_to_cache(group: Any) -> list[Path]:
    """Every image of ``group`` that gets a latent cache (those without pre-computed latents)."""
    return [Path(entry.path) for di, ds in enumerate(group.datasets) for ei, entry in enumerate(ds.entries)
            if entry.path is not None and not group.uses_latents(di, ei)]
