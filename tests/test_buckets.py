"""Bucket generation and assignment against hand-computed cases (training_behaviour.md §10)."""

from __future__ import annotations

import random

import pytest

from library.data.buckets import (
    BucketManager,
    BucketSettings,
    assign_bucket,
    assign_no_upscale,
    assign_predefined,
    bucket_summary,
    make_bucket_resolutions,
    round_to_steps,
)

# A = 8 * 8 = 64; width w gives height min(1024, (64 // (w // 64)) * 64).
BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
    (1024, 256),
]


def test_buckets_512_match_the_spec_example():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == BUCKETS_512
    assert make_bucket_resolutions((512, 512)) == BUCKETS_512


def test_buckets_768():
    # A = 12 * 12 = 144: widths 256..576 hit the 1024 cap; 640 -> 14*64 = 896; 704 -> 13*64 = 832;
    # 768 -> 768; 960 and 1024 -> 9*64 = 576.
    expected = [
        (256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 960), (576, 1024),
        (640, 896), (704, 832), (768, 768), (832, 704), (896, 640), (960, 576), (1024, 256),
        (1024, 320), (1024, 384), (1024, 448), (1024, 512), (1024, 576),
    ]
    assert make_bucket_resolutions((768, 768), 256, 1024, 64) == expected


def test_buckets_non_square_512x768():
    # A = 8 * 12 = 96, square side isqrt(96) * 64 = 576 (not the resolution itself).
    expected = [
        (256, 1024), (320, 1024), (384, 896), (384, 960), (384, 1024), (448, 832), (512, 704),
        (512, 768), (576, 576), (576, 640), (640, 576), (704, 512), (768, 512), (832, 448),
        (896, 384), (960, 384), (1024, 256), (1024, 320), (1024, 384),
    ]
    buckets = make_bucket_resolutions((512, 768), 256, 1024, 64)
    assert buckets == expected
    assert make_bucket_resolutions((768, 512), 256, 1024, 64) == expected  # same area, same set


def test_min_size_not_multiple_of_steps_and_narrow_range():
    # widths 200, 264, ... start at min_size; 200 // 64 = 3 -> height (64 // 3) * 64 = 1344 -> cap 512
    buckets = make_bucket_resolutions((512, 512), 200, 512, 64)
    assert (200, 512) in buckets and (512, 200) in buckets and (512, 512) in buckets
    assert buckets == sorted(set(buckets))
    with pytest.raises(ValueError):
        make_bucket_resolutions((512, 512), 1024, 256, 64)


def test_round_to_steps():
    assert round_to_steps(591.2, 64) == 576
    assert round_to_steps(639.5, 64) == 640
    assert round_to_steps(63.4, 64) == 0


def test_assign_predefined_by_hand():
    exact = assign_predefined((512, 512), BUCKETS_512)
    assert (exact.bucket, exact.resized_size, exact.ar_error) == ((512, 512), (512, 512), 0.0)
    # 1000x500 (ar 2.0): (704, 320) has ar 2.2 (error 0.2), (640, 384) 1.667 (0.333) -> (704, 320);
    # the image is narrower than the bucket, so width is matched: scale 0.704 -> (704, 352).
    wide = assign_predefined((1000, 500), BUCKETS_512)
    assert wide.bucket == (704, 320) and wide.resized_size == (704, 352)
    assert wide.ar_error == pytest.approx(0.2)
    # 300x400 (ar 0.75): (448, 576) has ar 0.7778 -> width matched: 448 / 300 -> (448, 597)
    tall = assign_predefined((300, 400), BUCKETS_512)
    assert tall.bucket == (448, 576) and tall.resized_size == (448, 597)
    # 1200x400 (ar 3.0): (832, 256) 3.25, (768, 320) 2.4, (896, 256) 3.5 -> (832, 256); width matched:
    # scale 832 / 1200 -> (832, int(277.33 + 0.5)) = (832, 277)
    wider = assign_predefined((1200, 400), BUCKETS_512)
    assert wider.bucket == (832, 256) and wider.resized_size == (832, 277)
    # 2000x500 (ar 4.0): the widest bucket (1024, 256) has ar 4.0 exactly; 2100x500 (ar 4.2) is wider
    # than it, so height is matched: scale 256 / 500 -> (int(1075.2 + 0.5), 256) = (1075, 256)
    assert assign_predefined((2000, 500), BUCKETS_512).resized_size == (1024, 256)
    widest = assign_predefined((2100, 500), BUCKETS_512)
    assert widest.bucket == (1024, 256) and widest.resized_size == (1075, 256)


def test_assign_predefined_ties_and_exact_size():
    # ar 2 lies exactly between 1 and 3: the first bucket in list order wins
    assert assign_predefined((200, 100), [(100, 100), (300, 100)]).bucket == (100, 100)
    assert assign_predefined((200, 100), [(300, 100), (100, 100)]).bucket == (300, 100)
    # same aspect ratio as (256, 256) but the exact size is a bucket: that one is used
    assert assign_predefined((512, 512), [(256, 256), (512, 512)]).bucket == (512, 512)
    assert assign_predefined((384, 384), [(256, 256), (512, 512)]).bucket == (256, 256)


def test_no_upscale_by_hand():
    small = assign_no_upscale((300, 200), (512, 512), 64)
    assert small.resized_size == (300, 200) and small.bucket == (256, 192)
    assert small.ar_error == pytest.approx(256 / 192 - 1.5)
    # 1024x768 -> area 512*512: width 591.2 -> 576 gives height 432 -> 384 (ar 1.5, error 0.167);
    # height 443.4 -> 384 gives width 512 (ar 1.333, error 0) -> height-rounded: (512, 384)
    big = assign_no_upscale((1024, 768), (512, 512), 64)
    assert big.resized_size == (512, 384) and big.bucket == (512, 384) and big.ar_error == pytest.approx(0)
    # 3000x2000: both roundings give ar 1.5 (tie -> height-rounded): (576, 384); 2000x500 -> (1024, 256)
    assert assign_no_upscale((3000, 2000), (512, 512), 64).bucket == (576, 384)
    assert assign_no_upscale((2000, 500), (512, 512), 64).resized_size == (1024, 256)
    with pytest.raises(ValueError):
        assign_no_upscale((50, 50), (512, 512), 64)


def test_non_bucketed_fixed_resolution_resizes_to_cover():
    settings = BucketSettings(resolution=(512, 512), enable_bucket=False)
    assert settings.candidate_resos() == [(512, 512)]
    wide = assign_bucket((1000, 500), settings)
    assert wide.bucket == (512, 512) and wide.resized_size == (1024, 512)
    small = assign_bucket((256, 200), settings)  # upscaled to cover (the reference asserted)
    assert small.bucket == (512, 512) and small.resized_size == (655, 512)


def test_manager_summary_and_info():
    manager: BucketManager[str] = BucketManager(BucketSettings(resolution=(512, 512), enable_bucket=True))
    for key, size, repeats in [("a", (512, 512), 10), ("b", (512, 512), 10), ("c", (1000, 500), 3)]:
        manager.add_image(manager.select_bucket(*size), key, repeats)
    manager.sort()
    assert manager.resos == BUCKETS_512
    lines = manager.summary_lines()
    assert lines[:2] == [
        "bucket 8: resolution (512, 512), count: 20",
        "bucket 11: resolution (704, 320), count: 3",
    ]
    assert lines[2].startswith("mean ar error (without repeats): 0.0666")
    info = manager.bucket_info()
    assert info["buckets"] == {
        8: {"resolution": (512, 512), "count": 20},
        11: {"resolution": (704, 320), "count": 3},
    }
    assert info["mean_img_ar_error"] == pytest.approx(0.2 / 3)
    manager.shuffle(random.Random(1))
    assert sorted(manager.buckets[11]) == ["c", "c", "c"]


def test_manager_no_upscale_buckets_from_images():
    settings = BucketSettings(resolution=(512, 512), enable_bucket=True, no_upscale=True)
    manager: BucketManager[int] = BucketManager(settings)
    assert manager.resos == []
    for i, size in enumerate([(1024, 768), (300, 200), (300, 210), (128, 128)]):
        manager.add_image(manager.select_bucket(*size), i)
    manager.sort()
    assert manager.resos == [(128, 128), (256, 192), (512, 384)]
    assert [len(b) for b in manager.buckets] == [1, 2, 1]
    assert bucket_summary(manager.resos, [1, 0, 2], [0.5, -0.5])[:2] == [
        "bucket 0: resolution (128, 128), count: 1",
        "bucket 2: resolution (512, 384), count: 2",
    ]


def test_predefined_from_metadata():
    settings = BucketSettings(resolution=(512, 512), enable_bucket=True, predefined=((512, 768), (768, 512)))
    assert assign_bucket((600, 900), settings).bucket == (512, 768)
    assert assign_bucket((1000, 500), settings).bucket == (768, 512)


def test_small_resolution_has_no_zero_sized_buckets():
    from library.data.buckets import make_bucket_resolutions

    assert make_bucket_resolutions((64, 64), 64, 256, 64) == [(64, 64)]
