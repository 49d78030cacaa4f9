"""Latent caching: encode every training image once with the VAE, in memory or in ``.npz`` files.

Follows training_behaviour.md §22 and file_formats.md §6. Sizes are ``(width, height)``; latents are
``[4, H/8, W/8]`` float32 *unscaled* posterior samples (multiply by the VAE scaling factor before use).

File layout (what the reference reads, plus one harmless extra):

* ``<image path without extension>.npz`` and ``..._flip.npz`` (the mirrored crop), written with
  ``np.savez``: the latent as the positional array ``arr_0`` (the only key the reference reads) and a
  0-d unicode array ``sdtrain_meta`` holding JSON: format version, bucket_reso, resized_size, whether
  the file holds the mirrored crop, and the source image's byte size, mtime (ns) and BLAKE2b content
  hash. A unicode array loads without pickle, and ``np.load(f)["arr_0"]`` ignores extra keys, so the
  reference and older tools read our files unchanged. Files are written to a temporary name in the same
  folder and moved into place with ``os.replace`` (a crash never leaves a half-written ``.npz``; no
  fsync, a file truncated by a power cut is caught by the validity check and rebuilt).
* Reading accepts ``arr_0`` or ``latents`` (newer kohya writers), any float dtype, returned as float32.

Staleness: the reference re-uses a file when its spatial shape fits the bucket and nothing else. We also
reject files that cannot be read (truncated zip, garbage) or hold non-finite values, and, when our meta
is present, files made for another bucket/resize or from another version of the image: a different
byte size means stale; same size and mtime means current; same size but another mtime (a copied or
touched dataset) lets the content hash decide, so a plain copy does not trigger a rebuild. Files without
our meta (made by the reference) get the reference's shape-only check. When the image is missing, a
file whose meta matches the request is trusted (it could not be rebuilt anyway). Like the reference,
the VAE and the noise seed are not recorded: changing the VAE needs the old files deleted.

Sampling: the posterior sample's noise comes from a CPU ``torch.Generator`` seeded per image by
:func:`latent_seed` (``seed`` argument, the image's *file name* and the flip flag), so the cache is the
same for any batch size, worker count, request order, device or folder location.

Parallel loading (:mod:`library.data.latent_loading`): image decoding, resizing and cropping run in a ``torch.utils.data.DataLoader`` over the
batch list (``num_workers=workers``, fork where available, 2 batches prefetched per worker, so memory
stays bounded) while the main process runs the VAE; see :func:`cache_latents` for the measurements behind
the choice. ``loader="process"``/``"thread"`` select a bounded ``concurrent.futures`` pool instead (kept
for the benchmark).

Difference from the reference: batches group requests of one bucket, each request carrying its own flip
setting (the reference took crop/flip settings from the last scanned subset, quirk 8), sorted by bucket
area and then by bucket, so two buckets of equal area never interleave into tiny batches.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.data.latent_loading import Loaded, Size, default_latent_workers, image_info, iter_loaded, make_batches
from library.distributed import record_start_up
from library.errors import UserError
from library.fileio import temp_prefix
from library.output_safety import classify

META_KEY = "sdtrain_meta"
META_FORMAT = 1
LATENT_CHANNELS = 4


# --------------------------------------------------------------------------------------------------
# requests, names, seeds


@dataclass(frozen=True)
class LatentRequest:
    """One image to cache: its bucket, the size it is resized to before the centre crop, flip, file.

    ``flip`` also encodes the horizontally mirrored crop. ``npz_path`` is the disk cache (``None`` keeps
    the latent in memory only); its mirrored twin is :func:`flip_npz_path` of it. ``interpolation`` is the
    subset's ``resize_interpolation`` (None: the default rule of :func:`library.data.images.resize_image`).
    """

    image_path: Path
    bucket_reso: Size
    resized_size: Size
    flip: bool = False
    npz_path: Path | None = None
    interpolation: str | None = None

    def latent_shape(self) -> tuple[int, int, int]:
        """``(4, bucket_h / 8, bucket_w / 8)``, the shape of this request's latent."""
        return LATENT_CHANNELS, self.bucket_reso[1] // 8, self.bucket_reso[0] // 8


def npz_paths(image_path: str | os.PathLike) -> tuple[Path, Path]:
    """The reference's cache names: ``<image path without extension>.npz`` and ``..._flip.npz``."""
    main = Path(os.path.splitext(os.fspath(image_path))[0] + ".npz")
    return main, flip_npz_path(main)


def flip_npz_path(npz_path: str | os.PathLike) -> Path:
    """The mirrored twin of a cache file: ``x.npz`` -> ``x_flip.npz``."""
    base = os.path.splitext(os.fspath(npz_path))[0]
    return Path(base + "_flip.npz")


def latent_seed(image_path: str | os.PathLike, seed: int, flipped: bool) -> int:
    """The noise seed of one latent: BLAKE2b of ``seed``, the image's file name and ``flipped``.

    Only the file name is used (not the folder), so a dataset gives the same cache wherever it lives.
    """
    text = f"{int(seed)}\0{Path(image_path).name}\0{int(bool(flipped))}"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _check_request(request: LatentRequest) -> None:
    """Reject buckets the VAE cannot map to ``[4, H/8, W/8]`` and resize sizes that do not cover them."""
    bucket_w, bucket_h = request.bucket_reso
    if bucket_w <= 0 or bucket_h <= 0 or bucket_w % 8 or bucket_h % 8:
        raise UserError(
            f"bucket {bucket_w}x{bucket_h} for {request.image_path} is not a positive multiple of 8: "
            "check --resolution and --bucket_reso_steps"
        )
    if request.resized_size[0] < bucket_w or request.resized_size[1] < bucket_h:
        raise ValueError(f"resized size {request.resized_size} does not cover bucket {request.bucket_reso}")


# --------------------------------------------------------------------------------------------------
# npz files


def make_meta(request: LatentRequest, flipped: bool, image_info: dict[str, Any] | None) -> dict[str, Any]:
    """The ``sdtrain_meta`` record of one cache file (see the module docstring)."""
    return {"format": META_FORMAT, "bucket_reso": list(request.bucket_reso),
            "resized_size": list(request.resized_size), "flipped": bool(flipped),
            "resize_interpolation": request.interpolation, **(image_info or {})}


def save_latent_npz(path: str | os.PathLike, latent: np.ndarray, meta: dict[str, Any] | None = None) -> None:
    """Write ``latent`` ``[4, h, w]`` as float32 ``arr_0`` (plus ``sdtrain_meta`` JSON), atomically.

    The file is written under a temporary name in the destination folder and renamed over ``path``.
    Raises :class:`UserError` naming the file when it cannot be written.
    """
    path = Path(path)
    array = np.ascontiguousarray(latent, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"latent must be [C, h, w], got shape {array.shape}")
    extra = {META_KEY: np.array(json.dumps(meta, sort_keys=True))} if meta is not None else {}
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp", delete=False
        ) as handle:
            tmp_name = handle.name
            np.savez(handle, array, **extra)
        os.replace(tmp_name, path)
        record_start_up("latent_writes", {"path": str(path)})  # --record_training_dir: who wrote which file
    except OSError as exc:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise UserError(f"cannot write latent cache {path}: {exc.strerror or exc}") from exc


def _read_npz(path: Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Latent (float32) and our meta (None when absent or unreadable) of a cache file; raises on errors."""
    with np.load(path, allow_pickle=False) as npz:
        key = next((k for k in ("arr_0", "latents") if k in npz.files), None)
        if key is None:
            raise KeyError("no 'arr_0' or 'latents' array")
        array = npz[key]
        try:
            meta = json.loads(str(npz[META_KEY])) if META_KEY in npz.files else None
        except ValueError:
            meta = None
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"latent dtype {array.dtype} is not floating point")
    return array.astype(np.float32, copy=False), meta if isinstance(meta, dict) else None


def load_latent_npz(path: str | os.PathLike) -> np.ndarray:
    """The float32 latent stored in a cache file (``arr_0``, or ``latents`` from newer kohya writers).

    Raises :class:`UserError` naming the file when it is missing, corrupt or holds no latent.
    """
    path = Path(path)
    try:
        return _read_npz(path)[0]
    except FileNotFoundError as exc:
        raise UserError(f"latent cache {path} does not exist") from exc
    except Exception as exc:  # zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError, ...
        raise UserError(f"cannot read latent cache {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _meta_matches(meta: dict[str, Any], request: LatentRequest, flipped: bool) -> bool:
    """Whether our meta fits the request and the image as it is now (size+mtime, else content hash)."""
    if meta.get("format") != META_FORMAT:
        return True  # a future layout: fall back to the reference's shape-only check
    made_for = (tuple(meta.get("bucket_reso", ())), tuple(meta.get("resized_size", ())), meta.get("flipped"))
    if made_for != (tuple(request.bucket_reso), tuple(request.resized_size), flipped):
        return False
    if meta.get("resize_interpolation") != request.interpolation:  # files without the key: the default rule
        return False
    if "image_hash" not in meta:
        return True
    try:
        stat = os.stat(request.image_path)
    except OSError:
        return True  # the image is gone; the cache is all there is
    if stat.st_size == meta.get("image_bytes") and stat.st_mtime_ns == meta.get("image_mtime_ns"):
        return True
    if stat.st_size != meta.get("image_bytes"):
        return False
    info = image_info(Path(request.image_path))
    return info is not None and info["image_hash"] == meta["image_hash"]


def _load_valid(path: Path, request: LatentRequest, flipped: bool) -> np.ndarray | None:
    """The latent of one cache file if it is usable for ``request``, else None (never raises)."""
    try:
        array, meta = _read_npz(path)
    except Exception:  # noqa: BLE001 - a damaged file may fail in zipfile, zlib, numpy: rebuild it
        return None
    if array.shape != request.latent_shape() or not np.isfinite(array).all():
        return None
    if meta is not None and not _meta_matches(meta, request, flipped):
        return None
    return array


def _load_trusted(path: Path, request: LatentRequest, flipped: bool) -> np.ndarray | None:
    """``--skip_cache_check``: the latent of an existing cache file without the freshness and finiteness
    checks; only a file that cannot be read, or whose latent has not the bucket's shape, is refused."""
    try:
        array = _read_npz(path)[0]
    except Exception:  # noqa: BLE001 - missing or damaged: it has to be (re)built
        return None
    return array if array.shape == request.latent_shape() else None


def _load_request(request: LatentRequest, skip_check: bool = False) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Both cached latents of a disk request when every needed file is valid (with ``skip_check``: exists
    and holds a latent of the right shape), else None."""
    if request.npz_path is None:
        return None
    load = _load_trusted if skip_check else _load_valid
    latent = load(Path(request.npz_path), request, flipped=False)
    if latent is None:
        return None
    if not request.flip:
        return latent, None
    flipped = load(flip_npz_path(request.npz_path), request, flipped=True)
    return None if flipped is None else (latent, flipped)


def release_device_memory(device: torch.device) -> bool:
    """Free cached accelerator memory (``gc.collect`` and the CUDA / MPS cache), as the reference does
    after every latent batch unless ``--highvram``; True when there was such a cache (not on the CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return True
    if device.type == "mps" and hasattr(torch, "mps"):
        gc.collect()
        torch.mps.empty_cache()
        return True
    return False


def is_npz_valid(path: str | os.PathLike, request: LatentRequest) -> bool:
    """True if ``path`` (and its ``_flip`` twin when ``request.flip``) can be re-used for ``request``.

    Valid means: readable, a float latent of shape ``[4, h/8, w/8]`` for the bucket, all finite, and,
    when our meta is present, made for the same bucket/resize from the image as it is now. Corrupt files
    give False, not an exception.
    """
    path = Path(path)
    if _load_valid(path, request, flipped=False) is None:
        return False
    return not request.flip or _load_valid(flip_npz_path(path), request, flipped=True) is not None


# --------------------------------------------------------------------------------------------------
# encoding


def encode_batch(
    vae: torch.nn.Module, images: np.ndarray | torch.Tensor, seeds: Sequence[int] | None = None
) -> np.ndarray:
    """Encode uint8 RGB images ``(B, H, W, 3)`` to float32 posterior samples ``(B, 4, H/8, W/8)``.

    Pixels are mapped to ``x / 127.5 - 1`` on the VAE's device and cast to its dtype; the VAE runs in
    eval mode under ``torch.no_grad()``. The sample is ``mean + std * noise`` (what
    ``latent_dist.sample()`` computes) with the noise of image ``i`` drawn in float32 on the CPU from a
    generator seeded with ``seeds[i]`` (default ``i``), so results do not depend on the batch or device.
    The sample is formed in float32 even for a half-precision VAE. Unscaled, as the reference stores it.
    """
    batch = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {tuple(batch.shape)} {batch.dtype}")
    count = batch.shape[0]
    seed_list = list(range(count)) if seeds is None else [int(s) for s in seeds]
    if len(seed_list) != count:
        raise ValueError(f"{len(seed_list)} seeds for {count} images")
    param = next(vae.parameters())
    vae.eval()
    with torch.no_grad():
        x = batch.to(param.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        posterior = vae.encode(x.to(param.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        gens = [torch.Generator().manual_seed(s) for s in seed_list]
        noise = torch.stack([torch.randn(tuple(mean.shape[1:]), generator=g) for g in gens]).to(mean.device)
        latents = mean + std * noise
    return latents.cpu().numpy()


# --------------------------------------------------------------------------------------------------
# the caching loop


@dataclass
class CacheStats:
    """What :func:`cache_latents` did and where the time went.

    ``rebuilt`` counts encoded disk requests whose cache file existed but was unusable; ``failed`` lists
    ``(image path, reason)`` of images that could not be read (their result slot is None).
    ``wait_seconds`` is the time the main process spent blocked on the image loader (with
    ``workers=0`` that is all the decoding), ``vae_seconds`` the time in :func:`encode_batch`,
    ``write_seconds`` writing npz files, ``check_seconds`` validating existing ones.
    """

    encoded: int = 0
    reused: int = 0
    rebuilt: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    batches: int = 0
    total_seconds: float = 0.0
    check_seconds: float = 0.0
    wait_seconds: float = 0.0
    vae_seconds: float = 0.0
    write_seconds: float = 0.0

    @property
    def wait_share(self) -> float:
        """Share of the total time the VAE sat waiting for images (0 when nothing ran)."""
        return self.wait_seconds / self.total_seconds if self.total_seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"latents: {self.encoded} encoded ({self.rebuilt} rebuilt), {self.reused} reused, "
            f"{len(self.failed)} failed, {self.batches} batches in {self.total_seconds:.1f}s "
            f"(VAE {self.vae_seconds:.1f}s, waiting for images {self.wait_seconds:.1f}s)"
        )


def _convert(latent: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    """A result array in the requested dtype (None stays None)."""
    return None if latent is None else latent.astype(dtype, copy=False)


def _remove_unused_flip(request: LatentRequest) -> None:
    """Delete a leftover ``_flip.npz`` of a request without flip (prepare_buckets_latents behaviour)."""
    if request.npz_path is not None and not request.flip and classify(flip_npz_path(request.npz_path)) == "latents":
        try:
            os.unlink(flip_npz_path(request.npz_path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise UserError(f"cannot remove {flip_npz_path(request.npz_path)}: {exc.strerror or exc}") from exc


def cache_latents(
    requests: Sequence[LatentRequest],
    vae: torch.nn.Module,
    *,
    batch_size: int = 1,
    workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    dtype: np.dtype | type = np.float32,
    return_latents: bool = True,
    delete_unused_flip: bool = False,
    loader: str = "dataloader",
    skip_check: bool = False,
    high_vram: bool = False,
) -> tuple[list[tuple[np.ndarray, np.ndarray | None] | None], CacheStats]:
    """Encode (or re-use from disk) the latent of every request; returns ``(results, stats)``.

    ``results[i]`` is ``(latent, flipped_latent_or_None)`` for request ``i`` in ``dtype`` (float32 or
    float16), or None when its image could not be read (listed in ``stats.failed``). Disk requests whose
    files pass :func:`is_npz_valid` are loaded, not encoded; the others are encoded and written
    atomically beside the images (fp32, file_formats.md §6). ``return_latents=False`` keeps nothing in
    memory (every slot is None; use ``stats.failed``) for disk-only caching of large datasets.
    ``delete_unused_flip`` removes a stale ``_flip.npz`` of requests without flip, as
    prepare_buckets_latents does (training-time caching leaves it). ``skip_check`` (``--skip_cache_check``)
    uses every existing file whose latent has the bucket's shape without the freshness checks of
    :func:`is_npz_valid`. Unless ``high_vram`` (``--highvram``), cached accelerator memory is released after
    every VAE batch (:func:`release_device_memory`).

    Batches hold at most ``batch_size`` (``--vae_batch_size``) images of one bucket, in bucket-area
    order; the mirrored crops of a batch are encoded as a second VAE call of the same size or smaller.
    Images are decoded by ``workers`` DataLoader worker processes (``None``:
    :func:`default_latent_workers`; ``0``: in this process) while the VAE encodes. Measured with
    bench/latent_cache.py (2 shared cores, tiny VAE on the CPU, 400 JPEGs of 512-1024 px): at 256 px
    buckets the VAE dominates (29 -> 34 img/s, wait share 17% -> 3% with 2 workers); at 64 px with the
    VAE on one thread (decoding as costly as encoding, as with a GPU VAE) 125 img/s in-process vs
    215 (DataLoader), 218 (process pool) and 212 (threads) with 2 workers: equal within noise, and
    the DataLoader adds bounded prefetch and pinned-memory transfer. Noise seeds come from
    :func:`latent_seed`, so the results do not depend on ``batch_size``, ``workers`` or order.
    """
    if batch_size < 1:
        raise UserError(f"--vae_batch_size must be at least 1, got {batch_size}")
    out_dtype = np.dtype(dtype)
    if out_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype must be float32 or float16, got {out_dtype}")
    if workers is None:
        workers = default_latent_workers()
    for request in requests:
        _check_request(request)

    start = time.perf_counter()
    stats = CacheStats()
    results: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(requests)
    todo: list[int] = []
    for index, request in enumerate(requests):
        cached = _load_request(request, skip_check)
        if cached is not None:
            stats.reused += 1
            if return_latents:
                results[index] = (_convert(cached[0], out_dtype), _convert(cached[1], out_dtype))  # type: ignore[arg-type]
            if delete_unused_flip:
                _remove_unused_flip(request)
            continue
        if request.npz_path is not None and (
            Path(request.npz_path).exists() or flip_npz_path(request.npz_path).exists()
        ):
            stats.rebuilt += 1
        todo.append(index)
    stats.check_seconds = time.perf_counter() - start

    batches = make_batches(requests, todo, batch_size)
    device = next(vae.parameters()).device
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="caching latents", unit="img")
    source = iter_loaded(batches, workers, loader, pin_memory=device.type == "cuda")
    try:
        while True:
            waited = time.perf_counter()
            loaded = next(source, None)
            stats.wait_seconds += time.perf_counter() - waited
            if loaded is None:
                break
            _encode_loaded(loaded, requests, vae, seed, out_dtype, return_latents, delete_unused_flip, results, stats)
            if not high_vram:
                release_device_memory(device)
            if bar is not None:
                bar.update(len(loaded[0]) + len(loaded[2]))
    finally:
        if bar is not None:
            bar.close()
        if hasattr(source, "close"):  # a pool generator left early: shut its workers down now
            source.close()
    stats.total_seconds = time.perf_counter() - start
    return results, stats


def _encode_loaded(
    loaded: Loaded,
    requests: Sequence[LatentRequest],
    vae: torch.nn.Module,
    seed: int,
    out_dtype: np.dtype,
    return_latents: bool,
    delete_unused_flip: bool,
    results: list[tuple[np.ndarray, np.ndarray | None] | None],
    stats: CacheStats,
) -> None:
    """Encode one loaded batch (and its mirrored crops), write the disk caches, fill ``results``."""
    indices, images, failures, infos = loaded
    for index, reason in failures:
        stats.failed.append((Path(requests[index].image_path), reason))
    if images is None:
        return
    stats.batches += 1
    began = time.perf_counter()
    seeds = [latent_seed(requests[i].image_path, seed, False) for i in indices]
    images = torch.as_tensor(images)
    latents = encode_batch(vae, images, seeds)
    flip_rows = [row for row, i in enumerate(indices) if requests[i].flip]
    flipped: dict[int, np.ndarray] = {}
    if flip_rows:
        mirrored = images[flip_rows].flip(dims=[2])
        flip_seeds = [latent_seed(requests[indices[r]].image_path, seed, True) for r in flip_rows]
        flipped = dict(zip(flip_rows, encode_batch(vae, mirrored, flip_seeds), strict=True))
    stats.vae_seconds += time.perf_counter() - began
    stats.encoded += len(indices)

    began = time.perf_counter()
    for row, index in enumerate(indices):
        request = requests[index]
        flip_latent = flipped.get(row)
        if request.npz_path is not None:
            save_latent_npz(request.npz_path, latents[row], make_meta(request, False, infos[row]))
            if flip_latent is not None:
                save_latent_npz(flip_npz_path(request.npz_path), flip_latent, make_meta(request, True, infos[row]))
            elif delete_unused_flip:
                _remove_unused_flip(request)
        if return_latents:
            results[index] = (_convert(latents[row], out_dtype), _convert(flip_latent, out_dtype))  # type: ignore[assignment]
    stats.write_seconds += time.perf_counter() - began
