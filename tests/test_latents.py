"""Latent caching (library/data/latents.py): npz format, re-use and invalidation, flips, batching, workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from library.data.images import load_image_rgb, resize_and_crop
from library.data.latent_loading import make_batches
from library.data.latents import (
    CacheStats,
    LatentRequest,
    cache_latents,
    encode_batch,
    flip_npz_path,
    is_npz_valid,
    latent_seed,
    load_latent_npz,
    npz_paths,
    save_latent_npz,
)
from library.errors import UserError


class RecordingVAE(AutoencoderKL):
    """The real AutoencoderKL, recording the shape of every batch it encodes."""

    def encode(self, x, return_dict=True):
        """Record ``x.shape``, then encode as the parent does."""
        self.calls.append(tuple(x.shape))
        return super().encode(x, return_dict=return_dict)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    from library.models.random_model import build_random_model

    return build_random_model("tiny-sd1", seed=0).vae


@pytest.fixture()
def recording_vae(vae) -> RecordingVAE:
    rec = RecordingVAE.from_config(vae.config)
    rec.load_state_dict(vae.state_dict())
    rec.eval()
    rec.calls = []
    return rec


def _write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _request(path: Path, bucket=(64, 64), resized=None, flip=False, disk=True) -> LatentRequest:
    return LatentRequest(
        image_path=path,
        bucket_reso=bucket,
        resized_size=resized or bucket,
        flip=flip,
        npz_path=npz_paths(path)[0] if disk else None,
    )


def _cache(requests, vae, **kwargs):
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("progress", False)
    return cache_latents(requests, vae, **kwargs)


# ----------------------------------------------------------------------------------------------- format


def test_npz_paths_follow_reference_naming():
    assert npz_paths("/d/sub/img.v2.png") == (Path("/d/sub/img.v2.npz"), Path("/d/sub/img.v2_flip.npz"))
    assert flip_npz_path("/d/a.npz") == Path("/d/a_flip.npz")


def test_npz_round_trip_is_bit_exact_and_reference_readable(tmp_path):
    latent = np.random.default_rng(0).standard_normal((4, 12, 8)).astype(np.float32)
    path = tmp_path / "img.npz"
    save_latent_npz(path, latent, {"format": 1, "bucket_reso": [64, 96]})
    assert np.array_equal(load_latent_npz(path), latent)
    plain = np.load(path)  # how the reference reads it: no allow_pickle, key arr_0
    assert plain["arr_0"].dtype == np.float32 and plain["arr_0"].shape == (4, 12, 8)
    assert np.array_equal(plain["arr_0"], latent)
    assert [p.name for p in tmp_path.iterdir()] == ["img.npz"]  # no temporary file left behind


def test_newer_kohya_layout_is_read(tmp_path):
    latent = np.ones((4, 8, 8), dtype=np.float16)
    path = tmp_path / "new.npz"
    np.savez(path, latents=latent, original_size=np.array([64, 64]), crop_ltrb=np.array([0, 0, 64, 64]))
    loaded = load_latent_npz(path)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, latent.astype(np.float32))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.npz"):
        load_latent_npz(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match="bad.npz"):
        load_latent_npz(bad)


def test_bucket_must_be_multiple_of_8(tmp_path, vae):
    image = _write_image(tmp_path / "a.png", (64, 64), 0)
    with pytest.raises(UserError, match="a.png"):
        _cache([_request(image, bucket=(60, 64), resized=(64, 64))], vae)


# ------------------------------------------------------------------------------------ re-use, staleness


def test_valid_cache_is_reused_without_encoding(tmp_path, vae, recording_vae):
    images = [_write_image(tmp_path / f"{i}.png", (80, 64), i) for i in range(3)]
    requests = [_request(p, resized=(80, 64), flip=True) for p in images]
    first, stats = _cache(requests, vae)
    assert (stats.encoded, stats.reused, stats.rebuilt) == (3, 0, 0)
    mtimes = {p: p.stat().st_mtime_ns for r in requests for p in npz_paths(r.image_path)}
    assert all(is_npz_valid(r.npz_path, r) for r in requests)

    second, stats = _cache(requests, recording_vae)
    assert (stats.encoded, stats.reused, stats.rebuilt) == (0, 3, 0)
    assert recording_vae.calls == []
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    for (a, af), (b, bf) in zip(first, second):
        assert np.array_equal(a, b) and np.array_equal(af, bf)


def test_cache_for_another_bucket_is_rebuilt(tmp_path, vae):
    image = _write_image(tmp_path / "a.png", (96, 64), 1)
    _cache([_request(image, bucket=(64, 64), resized=(96, 64))], vae)
    other = _request(image, bucket=(96, 64))
    assert not is_npz_valid(other.npz_path, other)
    results, stats = _cache([other], vae)
    assert (stats.encoded, stats.rebuilt) == (1, 1)
    assert load_latent_npz(other.npz_path).shape == (4, 8, 12)
    assert results[0][0].shape == (4, 8, 12)


def test_reference_file_without_meta_gets_shape_check_only(tmp_path, vae):
    image = _write_image(tmp_path / "a.png", (64, 64), 2)
    request = _request(image)
    np.savez(request.npz_path, np.full((4, 8, 8), 0.5, dtype=np.float32))  # as the reference writes it
    results, stats = _cache([request], vae)
    assert stats.reused == 1 and np.all(results[0][0] == 0.5)
    np.savez(request.npz_path, np.zeros((4, 8, 16), dtype=np.float32))  # wrong spatial shape
    assert not is_npz_valid(request.npz_path, request)


@pytest.mark.parametrize("damage", ["truncated", "random", "nan", "missing_flip", "wrong_flip_shape"])
def test_damaged_cache_is_rebuilt(tmp_path, vae, damage):
    image = _write_image(tmp_path / "a.png", (64, 64), 3)
    request = _request(image, flip=True)
    first, _ = _cache([request], vae)
    good, good_flip = first[0]
    main, flipped = npz_paths(image)
    if damage == "truncated":
        main.write_bytes(main.read_bytes()[:200])
    elif damage == "random":
        main.write_bytes(np.random.default_rng(0).bytes(3000))
    elif damage == "nan":
        save_latent_npz(main, np.full((4, 8, 8), np.nan, dtype=np.float32))
    elif damage == "missing_flip":
        flipped.unlink()
    else:
        save_latent_npz(flipped, np.zeros((4, 4, 4), dtype=np.float32))
    assert not is_npz_valid(main, request)
    results, stats = _cache([request], vae)
    assert (stats.encoded, stats.rebuilt, stats.reused) == (1, 1, 0)
    assert is_npz_valid(main, request)
    assert np.array_equal(results[0][0], good) and np.array_equal(results[0][1], good_flip)


def test_replaced_image_makes_cache_stale(tmp_path, vae):
    image = _write_image(tmp_path / "a.png", (64, 64), 4)
    request = _request(image)
    _cache([request], vae)
    _write_image(image, (64, 64), 5)  # other content, other byte count and mtime
    assert not is_npz_valid(request.npz_path, request)
    _, stats = _cache([request], vae)
    assert (stats.encoded, stats.rebuilt) == (1, 1)
    # the image replaced by one of another pixel size: the caller's resized size changes with it
    _write_image(image, (128, 96), 6)
    resized = _request(image, resized=(85, 64))
    assert not is_npz_valid(resized.npz_path, resized)
    assert _cache([resized], vae)[1].rebuilt == 1


def test_same_size_new_mtime_uses_content_hash(tmp_path, vae):
    image = _write_image(tmp_path / "a.bmp", (64, 64), 7)  # BMP: same byte count for any content
    request = _request(image)
    _cache([request], vae)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched / copied: same bytes
    assert is_npz_valid(request.npz_path, request)
    _write_image(image, (64, 64), 8)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert image.stat().st_size == stat.st_size
    assert not is_npz_valid(request.npz_path, request)


# ----------------------------------------------------------------------------------------------- flips


def test_flip_latent_is_the_encoded_mirrored_crop(tmp_path, vae):
    image = _write_image(tmp_path / "a.png", (100, 64), 9)
    request = _request(image, bucket=(96, 64), resized=(100, 64), flip=True)
    results, _ = _cache([request], vae, seed=5)
    crop, _ = resize_and_crop(load_image_rgb(image), (96, 64), (100, 64))
    expected = encode_batch(vae, crop[None], [latent_seed(image, 5, False)])[0]
    expected_flip = encode_batch(vae, crop[:, ::-1][None], [latent_seed(image, 5, True)])[0]
    assert np.array_equal(results[0][0], expected)
    assert np.array_equal(results[0][1], expected_flip)
    assert np.array_equal(load_latent_npz(npz_paths(image)[1]), expected_flip)
    assert not np.array_equal(expected, expected_flip)


def test_unrequested_flip_file_is_kept_unless_asked(tmp_path, vae):
    image = _write_image(tmp_path / "a.png", (64, 64), 10)
    _cache([_request(image, flip=True)], vae)
    plain = _request(image)
    results, stats = _cache([plain], vae)
    assert stats.reused == 1 and results[0][1] is None
    assert npz_paths(image)[1].exists()  # training-time caching leaves it
    _cache([plain], vae, delete_unused_flip=True)  # prepare_buckets_latents behaviour
    assert not npz_paths(image)[1].exists()


# -------------------------------------------------------------------------------------------- batching


def test_make_batches_groups_by_bucket_and_respects_size(tmp_path):
    buckets = [(64, 96), (96, 64)] * 5 + [(64, 64)] * 3  # two buckets of equal area, interleaved
    requests = [LatentRequest(Path(f"{i}.png"), b, b) for i, b in enumerate(buckets)]
    batches = make_batches(requests, range(len(requests)), 4)
    assert [len(b) for b in batches] == [3, 4, 1, 4, 1]
    for batch in batches:
        assert len({item[2] for item in batch}) == 1
    assert [item[0] for item in batches[1]] == [0, 2, 4, 6]  # request order kept inside a bucket


def test_vae_batches_never_mix_buckets(tmp_path, recording_vae):
    sizes = [(64, 64), (96, 64), (64, 96)] * 3
    images = [_write_image(tmp_path / f"{i}.png", s, i) for i, s in enumerate(sizes)]
    requests = [_request(p, bucket=s, flip=(i % 2 == 0), disk=False) for i, (p, s) in enumerate(zip(images, sizes))]
    results, stats = _cache(requests, recording_vae, batch_size=2)
    assert stats.encoded == 9 and stats.batches == 6
    assert all(shape[0] <= 2 for shape in recording_vae.calls)
    # by area then bucket: (64,64) [0,3] [6]; (64,96) [2,5] [8]; (96,64) [1,4] [7]; flips on even
    # indices add a mirrored call to every batch but the last
    assert [c[0] for c in recording_vae.calls] == [2, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1]
    assert [c[2:] for c in recording_vae.calls[::2]] == [(64, 64)] * 2 + [(96, 64)] * 2 + [(64, 96)] * 2
    for request, (latent, flipped) in zip(requests, results):
        assert latent.shape == (4, request.bucket_reso[1] // 8, request.bucket_reso[0] // 8)
        assert (flipped is not None) == request.flip


def test_results_do_not_depend_on_workers_batch_size_or_order(tmp_path, vae):
    sizes = [(64, 64), (96, 64), (64, 64), (64, 96), (64, 64), (96, 64)]
    images = [_write_image(tmp_path / f"{i}.jpg", s, i) for i, s in enumerate(sizes)]
    requests = [_request(p, bucket=s, flip=True, disk=False) for p, s in zip(images, sizes)]
    base, _ = _cache(requests, vae, workers=0, batch_size=1)
    parallel, stats = _cache(requests, vae, workers=2, batch_size=1)
    assert stats.encoded == 6
    for (a, af), (b, bf) in zip(base, parallel):  # same batches, other processes: bit-identical
        assert np.array_equal(a, b) and np.array_equal(af, bf)
    # CPU convolutions pick other kernels/blocking for other batch sizes: equal up to float rounding
    batched, _ = _cache(requests[::-1], vae, workers=2, batch_size=4)
    for (a, af), (b, bf) in zip(base, batched[::-1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(af, bf, rtol=1e-5, atol=1e-5)


def test_workers_after_threaded_resize_in_parent(tmp_path, vae):
    import cv2

    cv2.resize(np.zeros((1200, 1200, 3), np.uint8), (300, 300), interpolation=cv2.INTER_AREA)  # start cv2's pool
    images = [_write_image(tmp_path / f"{i}.png", (200, 128), i) for i in range(3)]
    requests = [_request(p, bucket=(96, 64), resized=(100, 64), disk=False) for p in images]
    base, _ = _cache(requests, vae, workers=0)
    parallel, stats = _cache(requests, vae, workers=2)
    assert stats.encoded == 3
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(base, parallel))


@pytest.mark.parametrize("loader", ["process", "thread"])
def test_alternative_loaders_match(tmp_path, vae, loader):
    # batches over torch's parallel-copy grain size: a torch op in a forked pool worker would hang
    images = [_write_image(tmp_path / f"{i}.png", (128, 128), i) for i in range(4)]
    requests = [_request(p, bucket=(128, 128), disk=False) for p in images]
    base, _ = _cache(requests, vae, workers=0, batch_size=2)
    other, stats = _cache(requests, vae, workers=2, loader=loader, batch_size=2)
    assert stats.encoded == 4 and stats.batches == 2
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(base, other))


# -------------------------------------------------------------------------------------- failures, misc


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_skipped_and_reported(tmp_path, vae, workers):
    good = [_write_image(tmp_path / f"{i}.png", (64, 64), i) for i in range(3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:60])
    missing = tmp_path / "missing.png"
    requests = [_request(p) for p in (good[0], broken, good[1], missing, good[2])]
    results, stats = _cache(requests, vae, workers=workers, batch_size=2)
    assert [r is None for r in results] == [False, True, False, True, False]
    assert sorted(p.name for p, _ in stats.failed) == ["broken.png", "missing.png"]
    assert all(reason for _, reason in stats.failed)
    assert stats.encoded == 3 and not npz_paths(broken)[0].exists()


def test_float16_results_memory_only_and_stats(tmp_path, vae):
    images = [_write_image(tmp_path / f"{i}.png", (64, 64), i) for i in range(2)]
    results, stats = _cache([_request(p, disk=False) for p in images], vae, dtype=np.float16)
    assert all(r[0].dtype == np.float16 for r in results)
    assert not list(tmp_path.glob("*.npz"))
    assert isinstance(stats, CacheStats) and stats.total_seconds >= stats.vae_seconds > 0
    assert 0.0 <= stats.wait_share <= 1.0 and "2 encoded" in stats.summary()
    disk = [_request(p) for p in images]
    nothing, stats = _cache(disk, vae, return_latents=False)
    assert nothing == [None, None] and stats.encoded == 2 and all(r.npz_path.exists() for r in disk)


def test_encode_batch_is_deterministic_per_seed(vae):
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    a = encode_batch(vae, images, [1, 2])
    assert a.dtype == np.float32 and a.shape == (2, 4, 8, 8)
    assert np.array_equal(a, encode_batch(vae, torch.from_numpy(images), [1, 2]))
    assert not np.array_equal(a, encode_batch(vae, images, [3, 4]))
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
    noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(2))
    expected = dist.mean[1] + dist.std[1] * noise  # the unscaled posterior sample, image 1's own seed
    np.testing.assert_allclose(a[1], expected.numpy(), rtol=1e-6, atol=1e-6)
