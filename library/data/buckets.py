"""Aspect-ratio buckets: generation, assignment of image sizes, and the start-of-training summary.

Follows training_behaviour.md §10.1-10.2 (the reference's ``make_bucket_resolutions`` and
``BucketManager``). Sizes are ``(width, height)``. Assignment is a pure function of the image size and
the settings; the :class:`BucketManager` only adds book-keeping (which items sit in which bucket).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Generic, Iterable, Sequence, TypeVar

Size = tuple[int, int]
T = TypeVar("T")


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """The predefined buckets for ``max_reso = (W, H)``, sorted ascending as ``(width, height)``.

    With ``s = divisible`` and ``A = (W // s) * (H // s)``: the square ``(s * isqrt(A), s * isqrt(A))``,
    plus, for ``width = min_size, min_size + s, ... <= max_size``,
    ``height = min(max_size, (A // (width // s)) * s)`` in both orientations; duplicates removed.
    Widths start at ``min_size`` even when it is not a multiple of ``s`` (as in the reference).
    Pairs with a zero side (wide widths at small resolutions, where ``A // (width // s)`` is 0) are
    left out; the reference kept them but could never select them.
    """
    max_w, max_h = max_reso
    if divisible <= 0:
        raise ValueError(f"bucket_reso_steps must be positive, got {divisible}")
    if min_size < divisible:
        raise ValueError(f"min_bucket_reso ({min_size}) must be at least bucket_reso_steps ({divisible})")
    if min_size > max_size:
        raise ValueError(f"min_bucket_reso ({min_size}) must not exceed max_bucket_reso ({max_size})")
    area = (max_w // divisible) * (max_h // divisible)
    if area <= 0:
        raise ValueError(f"resolution {max_reso} is smaller than bucket_reso_steps ({divisible})")
    resos: set[Size] = set()
    square = math.isqrt(area) * divisible
    resos.add((square, square))
    width = min_size
    while width <= max_size:
        height = min(max_size, (area // (width // divisible)) * divisible)
        if height > 0:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def round_to_steps(x: float, steps: int) -> int:
    """``int(x + 0.5)`` floored to a multiple of ``steps`` (the reference's ``round_to_steps``)."""
    value = int(x + 0.5)
    return value - value % steps


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: its bucket, the size it is resized to before cropping, the aspect error.

    ``ar_error`` is ``bucket_w / bucket_h - image_w / image_h`` (signed, as in the reference).
    """

    bucket: Size
    resized_size: Size
    ar_error: float


def assign_predefined(image_size: Size, resos: Sequence[Size]) -> BucketAssignment:
    """Assign an image to one of ``resos`` (bucketing with upscaling allowed, or fixed resolution).

    An image whose size equals a bucket uses it. Otherwise the bucket with the closest aspect ratio
    ``w / h`` wins, the first in ``resos`` order on ties. The image is then scaled to cover the bucket:
    height matched if the image is wider than the bucket, else width, the other side rounded half up.
    With ``resos = [resolution]`` this is the non-bucketed path (resize to cover, then crop).
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid image size {image_size}")
    if not resos:
        raise ValueError("no buckets to choose from")
    aspect = width / height
    if (width, height) in resos:
        bucket = (width, height)
    else:
        best_index = 0
        best_error = math.inf
        for index, (bucket_w, bucket_h) in enumerate(resos):
            error = abs(bucket_w / bucket_h - aspect)
            if error < best_error:
                best_index, best_error = index, error
        bucket = tuple(resos[best_index])  # type: ignore[assignment]
    bucket_w, bucket_h = bucket
    if aspect > bucket_w / bucket_h:
        scale = bucket_h / height
    else:
        scale = bucket_w / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return BucketAssignment(bucket, resized, bucket_w / bucket_h - aspect)


def assign_no_upscale(image_size: Size, max_reso: Size, reso_steps: int) -> BucketAssignment:
    """Per-image bucket without upscaling (``--bucket_no_upscale``).

    An image larger in area than ``W * H`` is shrunk to that area keeping its aspect ratio; either its
    width or its height is rounded to a multiple of ``reso_steps`` (``round_to_steps``), whichever
    gives the smaller aspect error (the height-rounded variant on ties), and the other side follows the
    aspect ratio (rounded half up). Smaller images keep their size. The bucket is the resized size
    floored to multiples of ``reso_steps``; the excess is cropped. Raises ValueError when a side is
    smaller than ``reso_steps`` (the bucket would be empty).
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid image size {image_size}")
    aspect = width / height
    max_area = max_reso[0] * max_reso[1]
    if width * height > max_area:
        resized_w = math.sqrt(max_area * aspect)
        resized_h = max_area / resized_w
        w_rounded = round_to_steps(resized_w, reso_steps)
        h_in_w_rounded = round_to_steps(w_rounded / aspect, reso_steps)
        h_rounded = round_to_steps(resized_h, reso_steps)
        w_in_h_rounded = round_to_steps(h_rounded * aspect, reso_steps)
        if min(w_rounded, h_in_w_rounded, h_rounded, w_in_h_rounded) <= 0:
            raise ValueError(f"image {width}x{height} is too narrow for bucket_reso_steps {reso_steps}")
        error_w = abs(w_rounded / h_in_w_rounded - aspect)
        error_h = abs(w_in_h_rounded / h_rounded - aspect)
        if error_w < error_h:
            resized = (w_rounded, int(w_rounded / aspect + 0.5))
        else:
            resized = (int(h_rounded * aspect + 0.5), h_rounded)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % reso_steps, resized[1] - resized[1] % reso_steps)
    if bucket[0] <= 0 or bucket[1] <= 0:
        raise ValueError(f"image {width}x{height} is smaller than bucket_reso_steps {reso_steps}")
    return BucketAssignment(bucket, resized, bucket[0] / bucket[1] - aspect)


@dataclass(frozen=True)
class BucketSettings:
    """The dataset options that decide buckets.

    ``enable_bucket=False`` means one fixed bucket equal to ``resolution`` (images are resized to cover it
    and cropped; the reference's on-the-fly path refused to resize, quirk 9). ``predefined`` replaces the
    generated buckets (fine-tuning metadata with ``train_resolution``); ``min_size``/``max_size`` are
    ignored with ``no_upscale``.
    """

    resolution: Size
    enable_bucket: bool = False
    min_size: int = 256
    max_size: int = 1024
    reso_steps: int = 64
    no_upscale: bool = False
    predefined: tuple[Size, ...] | None = None

    def candidate_resos(self) -> list[Size]:
        """The predefined bucket list (empty for ``no_upscale``, where buckets come from the images)."""
        if self.predefined is not None:
            return [tuple(r) for r in self.predefined]  # type: ignore[misc]
        if not self.enable_bucket:
            return [tuple(self.resolution)]  # type: ignore[list-item]
        if self.no_upscale:
            return []
        return make_bucket_resolutions(self.resolution, self.min_size, self.max_size, self.reso_steps)


def assign_bucket(
    image_size: Size, settings: BucketSettings, resos: Sequence[Size] | None = None
) -> BucketAssignment:
    """Assign one image size under ``settings`` (``resos`` lets callers pass a precomputed list)."""
    if settings.enable_bucket and settings.no_upscale and settings.predefined is None:
        return assign_no_upscale(image_size, settings.resolution, settings.reso_steps)
    return assign_predefined(image_size, resos if resos is not None else settings.candidate_resos())


class BucketManager(Generic[T]):
    """Buckets of items (e.g. image keys), one list per resolution, with the reference's indexing.

    Items are added with their repeats. After :meth:`sort`, resolutions are in ascending
    ``(width, height)`` order and bucket indices (as printed and stored in metadata) refer to this
    order, empty predefined buckets included.
    """

    def __init__(self, settings: BucketSettings) -> None:
        """Create the manager with the predefined buckets of ``settings`` (none for no_upscale)."""
        self.settings = settings
        self._predefined = settings.candidate_resos()
        self.resos: list[Size] = list(self._predefined)
        self.buckets: list[list[T]] = [[] for _ in self.resos]
        self._index: dict[Size, int] = {r: i for i, r in enumerate(self.resos)}
        self.ar_errors: list[float] = []

    def select_bucket(self, width: int, height: int) -> BucketAssignment:
        """Assign an image size (no book-keeping); see :func:`assign_bucket`."""
        return assign_bucket((width, height), self.settings, self._predefined)

    def add_image(self, assignment: BucketAssignment, item: T, repeats: int = 1) -> None:
        """Put ``item`` ``repeats`` times into its bucket; its aspect error counts once."""
        reso = assignment.bucket
        index = self._index.get(reso)
        if index is None:
            index = len(self.resos)
            self.resos.append(reso)
            self.buckets.append([])
            self._index[reso] = index
        self.buckets[index].extend([item] * repeats)
        self.ar_errors.append(assignment.ar_error)

    def sort(self) -> None:
        """Order resolutions (and their buckets) ascending by ``(width, height)``."""
        order = sorted(range(len(self.resos)), key=lambda i: self.resos[i])
        self.resos = [self.resos[i] for i in order]
        self.buckets = [self.buckets[i] for i in order]
        self._index = {r: i for i, r in enumerate(self.resos)}

    def shuffle(self, rng: random.Random) -> None:
        """Shuffle the items inside every bucket with ``rng`` (bucket order is unchanged)."""
        for bucket in self.buckets:
            rng.shuffle(bucket)

    def mean_ar_error(self) -> float:
        """Mean absolute aspect-ratio error over the added images (without repeats)."""
        return mean_abs(self.ar_errors)

    def bucket_info(self) -> dict[str, Any]:
        """Metadata form: ``{"buckets": {i: {"resolution": (w, h), "count": n}}, "mean_img_ar_error": x}``.

        Only non-empty buckets are listed; counts include repeats; indices follow the sorted order.
        """
        buckets = {
            i: {"resolution": reso, "count": len(items)}
            for i, (reso, items) in enumerate(zip(self.resos, self.buckets, strict=True))
            if items
        }
        return {"buckets": buckets, "mean_img_ar_error": self.mean_ar_error()}

    def summary_lines(self) -> list[str]:
        """The lines printed at start; see :func:`bucket_summary`."""
        return bucket_summary(self.resos, [len(b) for b in self.buckets], self.ar_errors)


def mean_abs(values: Iterable[float]) -> float:
    """Mean of absolute values, 0.0 when there are none."""
    values = list(values)
    return math.fsum(abs(v) for v in values) / len(values) if values else 0.0


def bucket_summary(resos: Sequence[Size], counts: Sequence[int], ar_errors: Sequence[float]) -> list[str]:
    """Start-of-training bucket report, as the reference prints it.

    One line ``bucket {i}: resolution {(w, h)}, count: {n}`` per non-empty bucket (``i`` is the index in
    ``resos``, counts include repeats), then ``mean ar error (without repeats): {x}``.
    """
    lines = [
        f"bucket {i}: resolution {tuple(reso)}, count: {count}"
        for i, (reso, count) in enumerate(zip(resos, counts, strict=True))
        if count > 0
    ]
    lines.append(f"mean ar error (without repeats): {mean_abs(ar_errors)}")
    return lines
