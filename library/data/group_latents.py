"""``--cache_latents`` / ``--cache_latents_to_disk`` for a whole dataset group, with one process or split
over all processes of a run (:func:`cache_shared_group_latents`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from library.data.cache_names import latent_cache_paths
from library.data.latents import LatentRequest, cache_latents
from library.distributed import gather_lists, record_start_up, recording_start_up, rank_and_world, wait_for_all

logger = logging.getLogger(__name__)


def cache_group_latents(group: Any, vae: Any, *, to_disk: bool, batch_size: int = 1, workers: int | None = None,
                        seed: int = 0, skip_check: bool = False, high_vram: bool = False) -> None:
    """Encode every image of ``group`` once (centre crop of its bucket, plus the mirrored crop for subsets
    with flip_aug) and keep the latents in ``group.latents``; with ``to_disk`` also write/reuse the
    ``.npz`` files beside the images (``skip_check``: existing files are trusted, ``--skip_cache_check``).
    ``high_vram`` keeps cached accelerator memory between VAE batches (``--highvram``). Images that fail
    to load are left out of training."""
    keys, requests = group_requests(group, to_disk)
    if not requests:
        return
    results, stats = cache_latents(requests, vae, batch_size=batch_size, workers=workers, seed=seed,
                                   skip_check=skip_check, high_vram=high_vram)
    store_results(group, keys, results)
    logger.info("%s", stats.summary())
    if stats.failed:
        logger.warning("left out %d image(s) that could not be encoded: %s", len(stats.failed),
                       "; ".join(f"{p}: {why}" for p, why in stats.failed[:10]))


def cache_shared_group_latents(group: Any, vae: Any, *, to_disk: bool, batch_size: int = 1,
                               workers: int | None = None, seed: int = 0, skip_check: bool = False,
                               high_vram: bool = False) -> None:
    """:func:`cache_group_latents` split over the processes of a run (the same with one process).

    Each process encodes only the images it owns (every N-th distinct cache file / image, N processes)
    with its own VAE copy. On disk it writes just those files; after a barrier (bounded by
    ``--ddp_timeout``) every process loads the files the others wrote; one still missing or unusable
    (e.g. a dataset folder that is not shared between machines) is encoded and written by the process
    that needs it. In memory the processes exchange their latents (:func:`library.distributed.gather_lists`),
    so every process ends with every latent. Latents do not depend on who encodes them
    (:func:`library.data.latents.latent_seed`)."""
    keys, requests = group_requests(group, to_disk)
    if not requests:
        return
    rank, world = rank_and_world()
    owners = owner_ranks(requests, keys, world)
    mine = [i for i, owner in enumerate(owners) if owner == rank]
    settings = {"batch_size": batch_size, "seed": seed, "skip_check": skip_check, "high_vram": high_vram}
    own_results, stats = cache_latents([requests[i] for i in mine], vae, workers=workers, progress=rank == 0,
                                       **settings)
    results: list[Any] = [None] * len(requests)
    for i, result in zip(mine, own_results):
        results[i] = result
    logger.info("%s%s", f"process {rank}: " if world > 1 else "", stats.summary())
    failed = list(stats.failed)
    if world > 1 and to_disk:
        wait_for_all("caching latents")  # every owned file is written now
        others = [i for i, owner in enumerate(owners) if owner != rank]
        loaded, more = cache_latents([requests[i] for i in others], vae, workers=0, progress=False, **settings)
        for i, result in zip(others, loaded):
            results[i] = result
        if more.encoded:
            logger.warning("process %d encoded %d latent(s) whose files another process should have written (is "
                           "the dataset folder not shared between the machines?)", rank, more.encoded)
        failed += more.failed
    elif world > 1:
        for part in gather_lists([(i, results[i]) for i in mine], "sharing the cached latents"):
            for i, result in part:
                results[i] = result
    store_results(group, keys, results)
    _record_latents(group, keys, results)
    if failed:
        logger.warning("left out %d image(s) that could not be encoded: %s", len(failed),
                       "; ".join(f"{p}: {why}" for p, why in failed[:10]))


def owner_ranks(requests: list[LatentRequest], keys: list[tuple[int, int]], world: int) -> list[int]:
    """The process that encodes each request: requests sharing a cache file (or, in memory, an entry)
    share an owner, and the distinct ones are dealt out in turn, so each file is written by one process."""
    slots: dict[Any, int] = {}
    owners = []
    for request, key in zip(requests, keys):
        name = request.npz_path if request.npz_path is not None else key
        owners.append(slots.setdefault(name, len(slots)) % world)
    return owners


def _record_latents(group: Any, keys: list[tuple[int, int]], results: list[Any]) -> None:
    """For ``--record_training_dir``: a digest of every cached latent of this process, by image key."""
    import hashlib

    if not recording_start_up():
        return
    digests = {}
    for key, result in zip(keys, results):
        if result is not None:
            digest = hashlib.sha1(result[0].tobytes())
            if result[1] is not None:
                digest.update(result[1].tobytes())
            digests[group.datasets[key[0]].entries[key[1]].key] = digest.hexdigest()
    record_start_up("latents", digests)


def group_requests(group: Any, to_disk: bool) -> tuple[list[tuple[int, int]], list[LatentRequest]]:
    """``(keys, requests)``: one :class:`LatentRequest` per image of ``group`` that needs a latent (those
    without pre-computed latents), keyed ``(dataset index, entry index)``; with ``to_disk`` each names
    its ``.npz`` file."""
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
    return keys, requests


def store_results(group: Any, keys: list[tuple[int, int]], results: list[Any]) -> None:
    """Put each result of :func:`library.data.latents.cache_latents` into ``group.latents``; an image
    without one (it could not be read) is left out of training."""
    for key, result in zip(keys, results):
        if result is not None:
            group.latents[key] = result
        else:
            group.mark_failed(group.datasets[key[0]].entries[key[1]].key)


def _images_to_cache(group: Any) -> list[Path]:
    """Every image of ``group`` that gets a latent cache (those without pre-computed latents)."""
    return [Path(entry.path) for di, ds in enumerate(group.datasets) for ei, entry in enumerate(ds.entries)
            if entry.path is not None and not group.uses_latents(di, ei)]
