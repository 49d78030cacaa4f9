"""Image discovery, header reads, decoding to RGB, and the per-sample image augmentations.

Everything random takes a ``random.Random`` from the caller, so crops, flips and colour shifts are pure
functions of the caller's seed. Sizes are always ``(width, height)``; arrays are ``(H, W, 3)`` uint8 RGB.

Differences from the reference (kohya-ss/sd-scripts, see docs):

* EXIF orientation is honoured, both when reading sizes and when decoding (the reference ignores it, so
  phone photos were trained sideways). The orientation comes from the metadata available at header time
  (EXIF block, XMP ``tiff:Orientation``), so the size used for bucketing and the decoded pixels always
  agree.
* Transparent pixels are composited on white by default (the reference's ``convert("RGB")`` drops alpha
  and exposes whatever colour the transparent pixels happen to store, often black);
  ``alpha_background=None`` gives the reference behaviour.
* 16-bit greyscale is scaled to 8 bits (``round(v * 255 / 65535)``) instead of being clipped at 255.
* Extensions are matched case-insensitively (the reference finds only all-lower or all-upper case).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from PIL import Image

from library.errors import UserError
from library.distributed import record_start_up

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

Size = tuple[int, int]


class ImageLoadError(UserError):
    """An image file that cannot be read: missing, empty, not an image, or corrupt."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


# --------------------------------------------------------------------------------------------------
# discovery


def is_image_file(path: str | os.PathLike) -> bool:
    """True if the file name ends with one of :data:`IMAGE_EXTENSIONS`, in any letter case."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (and its sub-folders when ``recursive``), sorted by path.

    Paths are ``folder`` joined with the relative path (not made absolute), as in the reference.
    Directories whose name looks like an image are skipped, symbolic links to directories are not
    descended into (no loops), and the result has no duplicates. Sorting is ``pathlib`` ordering.
    """
    root = Path(folder)
    found: list[Path] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if recursive and entry.is_dir(follow_symlinks=False):
                    pending.append(directory / entry.name)
                elif is_image_file(entry.name) and entry.is_file():
                    found.append(directory / entry.name)
    return sorted(set(found))


# --------------------------------------------------------------------------------------------------
# header reads


def _header_orientation(im: Image.Image) -> int:
    """EXIF orientation (1-8) from metadata read at open time; never decodes pixels.

    ``Image.Image.getexif`` (the base method) only looks at ``im.info``; the PNG override would call
    ``load()`` (a full decode) when the file has no eXIf chunk before its pixel data.
    """
    try:
        value = Image.Image.getexif(im).get(_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF blocks are ignored, like a missing tag
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _open_checked(path: Path) -> Image.Image:
    """Open ``path`` lazily with Pillow, turning every failure into :class:`ImageLoadError`."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError(path, "empty file")
    except OSError as exc:
        raise ImageLoadError(path, exc.strerror or type(exc).__name__) from exc
    try:
        return Image.open(path)
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(path, _short_reason(exc)) from exc


def _short_reason(exc: BaseException) -> str:
    """A one-line reason for an exception raised by Pillow or the file system."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "cannot identify image file" in text:
        return "not a recognised image format"
    return text[:200] or type(exc).__name__


def read_image_size(path: str | os.PathLike) -> Size:
    """``(width, height)`` of an image as displayed, reading only the file header.

    Pillow's ``Image.open`` parses the header and defers decoding until pixels are accessed, so this is
    cheap (a few KiB read per file). Orientations 5-8 (rotated by 90 degrees) swap width and height.
    Raises :class:`ImageLoadError` for missing, empty or unidentifiable files. Pixel data is not checked:
    a file truncated after its header is only detected by :func:`load_image_rgb`.
    """
    path = Path(path)
    im = _open_checked(path)
    try:
        with im:
            width, height = im.size
            if _header_orientation(im) >= 5:
                width, height = height, width
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(path, _short_reason(exc)) from exc
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"invalid size {width}x{height}")
    return width, height


def _read_size_or_reason(path: Path) -> tuple[Path, Size | None, str | None]:
    """Worker for :func:`read_image_sizes`: the size, or the reason it could not be read."""
    try:
        return path, read_image_size(path), None
    except ImageLoadError as exc:
        return path, None, exc.reason


def _read_chunk(paths: list[str]) -> list[tuple[Size | None, str | None]]:
    """Process-pool worker: sizes or failure reasons for a chunk of paths (strings pickle cheaply)."""
    return [_read_size_or_reason(Path(p))[1:] for p in paths]


def _pool_context() -> tuple[multiprocessing.context.BaseContext, int]:
    """The start method for scan workers and the smallest list worth a pool with it.

    ``fork`` costs a few milliseconds per worker; ``spawn`` (the only choice on Windows, and macOS's
    default) re-imports this module in each worker, about 0.4 s, so it pays off only for big lists.
    """
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork"), 2000
    return multiprocessing.get_context("spawn"), 50000


def default_scan_workers() -> int:
    """Worker processes used by :func:`read_image_sizes` by default: usable CPUs, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def read_image_sizes(
    paths: Iterable[str | os.PathLike], workers: int | None = None
) -> tuple[dict[Path, Size], dict[Path, str]]:
    """Header sizes of many images: ``(sizes, failures)`` where ``failures`` maps path to reason.

    Parallelism: a process pool (``fork`` where available), chosen by measurement
    (bench/dataset_scan.py, 20,000 small JPEGs, 2 cores, warm page cache): serial 0.8 s, 2 fork
    processes 0.47 s, 2 spawn/forkserver processes 0.83 s (start-up eats the gain), and a thread pool
    1.2-2.9 s, slower than serial: Pillow's header parsing is Python code holding the GIL, file reads
    of a few KiB release it only briefly, and the threads then convoy on the GIL. (With both cores
    already busy with other work the pool lost about 15% to serial.) ``workers=None`` uses
    :func:`default_scan_workers`; ``workers <= 1`` or a short list (under 2,000 paths with fork, 50,000
    with spawn) reads serially in this process. The workers only parse headers (no torch, no threads),
    the same pattern as PyTorch's fork-started DataLoader workers. Both dicts keep the input order.
    """
    path_list = [Path(p) for p in paths]
    record_start_up("image_headers", {"count": len(path_list)})  # --record_training_dir: who read headers
    if workers is None:
        workers = default_scan_workers()
    context, threshold = _pool_context()
    if workers <= 1 or len(path_list) < threshold:
        results = [_read_size_or_reason(p)[1:] for p in path_list]
    else:
        strings = [os.fspath(p) for p in path_list]
        step = max(64, -(-len(strings) // (workers * 8)))
        chunks = [strings[i : i + step] for i in range(0, len(strings), step)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = [item for chunk in pool.map(_read_chunk, chunks) for item in chunk]
    sizes: dict[Path, Size] = {}
    failures: dict[Path, str] = {}
    for path, (size, reason) in zip(path_list, results, strict=True):
        if size is not None:
            sizes[path] = size
        else:
            failures[path] = reason or "unreadable"
    return sizes, failures


# --------------------------------------------------------------------------------------------------
# decoding


def _sixteen_bit_to_rgb(im: Image.Image) -> np.ndarray:
    """Scale a 16-bit (or 32-bit ``I``) greyscale image to 8-bit RGB, treating 65535 as white."""
    values = np.asarray(im, dtype=np.int64)
    values = np.clip(values, 0, 65535)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _composite(im: Image.Image, background: tuple[int, int, int] | None) -> np.ndarray:
    """RGB pixels of an image with alpha: blended over ``background``, or alpha dropped when None."""
    rgba = np.asarray(im.convert("RGBA"))
    rgb = rgba[:, :, :3]
    if background is None:
        return np.ascontiguousarray(rgb)
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16).reshape(1, 1, 3)
    blended = (rgb.astype(np.uint16) * alpha + bg * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


def _has_transparency(im: Image.Image) -> bool:
    """True if the image carries an alpha channel or a transparency key (palette or single colour)."""
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def load_image_rgb(
    path: str | os.PathLike, alpha_background: tuple[int, int, int] | None = (255, 255, 255)
) -> np.ndarray:
    """Decode an image to a writable ``(H, W, 3)`` uint8 RGB array, upright per its EXIF orientation.

    Conversions: RGBA / LA / PA, palette or greyscale images with a transparency key are composited on
    ``alpha_background`` (white by default; ``None`` drops alpha like the reference's
    ``convert("RGB")``); 16-bit and 32-bit integer greyscale are scaled so 65535 maps to 255; L, 1-bit,
    CMYK, YCbCr and the rest go through Pillow's ``convert("RGB")``. Raises :class:`ImageLoadError` for
    missing, empty, unidentifiable, truncated or otherwise corrupt files.
    """
    path = Path(path)
    im = _open_checked(path)
    try:
        with im:
            orientation = _header_orientation(im)
            im.load()
            if im.mode in _SIXTEEN_BIT_MODES:
                array = _sixteen_bit_to_rgb(im)
            elif _has_transparency(im):
                array = _composite(im, alpha_background)
            elif im.mode == "RGB":
                array = np.asarray(im)
            else:
                array = np.asarray(im.convert("RGB"))
    except ImageLoadError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors, ...
        raise ImageLoadError(path, _short_reason(exc)) from exc
    return _apply_orientation(array, orientation)


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Transpose an ``(H, W, C)`` array like ``ImageOps.exif_transpose`` does for ``orientation``.

    The result is C-contiguous and writable (arrays viewing Pillow's bytes are read-only).
    """
    if orientation in (2, 4):
        array = array[:, ::-1] if orientation == 2 else array[::-1]
    elif orientation == 3:
        array = array[::-1, ::-1]
    elif orientation == 5:
        array = array.transpose(1, 0, 2)
    elif orientation == 6:
        array = np.rot90(array, k=-1)
    elif orientation == 7:
        array = array.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        array = np.rot90(array, k=1)
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


# --------------------------------------------------------------------------------------------------
# resizing and cropping

#: ``resize_interpolation`` names, as the reference accepts them in a dataset config
INTERPOLATIONS: tuple[str, ...] = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
_CV2_INTERPOLATION = {"nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
                      "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}
_PIL_INTERPOLATION = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}


def default_interpolation(source: Size, target: Size) -> str:
    """The reference's rule without ``resize_interpolation``: ``area`` when neither side grows, else ``lanczos``."""
    return "area" if source[0] >= target[0] and source[1] >= target[1] else "lanczos"


def resize_image(image: np.ndarray, size: Size, interpolation: str | None = None) -> np.ndarray:
    """Resize an ``(H, W, C)`` uint8 array to ``size`` (width, height) with a ``resize_interpolation`` name.

    As the reference: ``lanczos`` and ``box`` use Pillow (``LANCZOS``, ``BOX``); ``nearest`` is OpenCV
    ``INTER_NEAREST_EXACT``, ``bilinear``/``linear`` ``INTER_LINEAR``, ``bicubic``/``cubic`` ``INTER_CUBIC``,
    ``area`` ``INTER_AREA``; None picks :func:`default_interpolation`. Pillow resizes each channel on its
    own (the same numbers as an RGB resize, and a loss-mask 4th channel is not treated as alpha).
    """
    height, width = image.shape[:2]
    name = interpolation or default_interpolation((width, height), size)
    if name in _CV2_INTERPOLATION:
        return cv2.resize(image, tuple(size), interpolation=_CV2_INTERPOLATION[name])
    if name not in _PIL_INTERPOLATION:
        raise ValueError(f"unknown resize interpolation {name!r} (one of {', '.join(INTERPOLATIONS)})")
    planes = image[:, :, None] if image.ndim == 2 else image
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(planes[:, :, c])).resize(
        tuple(size), resample=_PIL_INTERPOLATION[name])) for c in range(planes.shape[2])]
    result = np.stack(out, axis=2)
    return result[:, :, 0] if image.ndim == 2 else result


def resize_and_crop(
    image: np.ndarray,
    bucket_reso: Size,
    resized_size: Size | None = None,
    random_crop: bool = False,
    rng: random.Random | None = None,
    interpolation: str | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize ``image`` to ``resized_size`` and crop it to ``bucket_reso``; returns ``(crop, (left, top))``.

    ``resized_size`` is the size chosen by bucket assignment (see ``library.data.buckets``); when None,
    the smallest aspect-preserving size that covers the bucket is used. Resizing goes through
    :func:`resize_image` with ``interpolation`` (``resize_interpolation``; None: OpenCV ``INTER_AREA``
    when shrinking, Pillow ``LANCZOS`` when enlarging, as the reference does since it gained the
    option). The excess is cropped from the centre (``floor(excess / 2)``)
    or, with ``random_crop``, at a uniform offset in ``[0, excess]`` drawn from ``rng`` (width first,
    then height, as in the reference). Offsets are in resized-image pixels.
    """
    bucket_w, bucket_h = bucket_reso
    height, width = image.shape[:2]
    if resized_size is None:
        resized_size = cover_size((width, height), bucket_reso)
    resized_w, resized_h = resized_size
    if resized_w < bucket_w or resized_h < bucket_h:
        raise ValueError(f"resized size {resized_size} does not cover the bucket {bucket_reso}")
    if (width, height) != (resized_w, resized_h):
        image = resize_image(image, (resized_w, resized_h), interpolation)
    if random_crop and rng is None:
        raise ValueError("random_crop needs an rng")
    left = _crop_offset(resized_w - bucket_w, random_crop, rng)
    top = _crop_offset(resized_h - bucket_h, random_crop, rng)
    crop = image[top : top + bucket_h, left : left + bucket_w]
    return np.ascontiguousarray(crop), (left, top)


def _crop_offset(excess: int, random_crop: bool, rng: random.Random | None) -> int:
    """Centre offset, or a uniform one from ``rng``; no draw is made when there is no excess."""
    if excess <= 0:
        return 0
    if random_crop:
        assert rng is not None
        return rng.randint(0, excess)
    return excess // 2


def cover_size(image_size: Size, bucket_reso: Size) -> Size:
    """Smallest aspect-preserving size of ``image_size`` that covers ``bucket_reso`` (reference rule).

    If the image is wider than the bucket its height is matched, otherwise its width; the other side
    is rounded half up (``int(x + 0.5)``).
    """
    width, height = image_size
    bucket_w, bucket_h = bucket_reso
    if width / height > bucket_w / bucket_h:
        scale = bucket_h / height
    else:
        scale = bucket_w / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


# --------------------------------------------------------------------------------------------------
# augmentations


def flip(image: np.ndarray, rng: random.Random, p: float = 0.5) -> tuple[np.ndarray, bool]:
    """Mirror ``image`` horizontally with probability ``p`` (one draw from ``rng``).

    Returns ``(image, flipped)``; ``flipped`` tells the caller which cached latent to use.
    """
    if rng.random() < p:
        return np.ascontiguousarray(image[:, ::-1]), True
    return image, False


def color_aug(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """The reference's weak colour augmentation on an RGB uint8 image.

    With probability 0.33 one of two transforms, chosen with equal odds, is applied: a hue shift
    uniform in [-8, 8] OpenCV hue units (1 unit = 2 degrees; saturation and value unchanged), or a gamma
    uniform in [0.95, 1.05]. Draws, in order: apply?, which?, parameter. Otherwise the image is returned
    unchanged. Lookup tables are rounded to nearest (albumentations truncated them).
    """
    if rng.random() >= 0.33:
        return image
    if rng.random() < 0.5:
        shift = rng.uniform(-8.0, 8.0)
        hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
        lut = np.mod(np.rint(np.arange(256) + shift), 180).astype(np.uint8)
        hsv[:, :, 0] = cv2.LUT(hsv[:, :, 0], lut)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = rng.uniform(0.95, 1.05)
    lut = np.clip(np.rint(((np.arange(256) / 255.0) ** gamma) * 255.0), 0, 255).astype(np.uint8)
    return cv2.LUT(np.ascontiguousarray(image), lut)


def parse_face_info(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """Face centre and size ``(cx, cy, w, h)`` from a file stem ending ``_<cx>_<cy>_<w>_<h>``.

    The four trailing parts must be non-negative integers (as written by detect_face_rotate.py, e.g.
    ``img_0256_0300_0120_0140.png``) and the face must have a positive size and centre x; otherwise
    None. (The reference crashed on a non-numeric suffix.)
    """
    parts = Path(path).stem.split("_")
    if len(parts) < 5 or not all(p.isdigit() for p in parts[-4:]):
        return None
    cx, cy, fw, fh = (int(p) for p in parts[-4:])
    if cx <= 0 or max(fw, fh) <= 0:
        return None
    return cx, cy, fw, fh


def strip_face_suffix(stem: str) -> str:
    """The stem without a trailing ``_<cx>_<cy>_<w>_<h>`` face suffix (unchanged if it has none)."""
    parts = stem.split("_")
    if len(parts) >= 5 and all(p.isdigit() for p in parts[-4:]):
        return "_".join(parts[:-4])
    return stem


def face_crop_aug_range(
    image: np.ndarray,
    face: tuple[int, int, int, int],
    resolution: Size,
    crop_range: tuple[float, float],
    random_crop: bool,
    rng: random.Random,
    interpolation: str | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Face-centred crop to ``resolution`` with a random zoom (non-bucketed datasets).

    ``face`` is ``(cx, cy, w, h)`` in image pixels and ``crop_range = (lo, hi)`` bounds the face size as a
    fraction of ``min(resolution)``: the face ends up between ``1/hi`` and ``1/lo`` of the short side,
    never enlarging the image unless it must to cover ``resolution`` (the reference then failed). The
    scale is uniform between the two bounds (one draw when they differ). The crop is centred on the face
    and kept inside the image; ``random_crop`` moves it by a triangular offset in ``[-r, r]`` with
    ``r = max(length - face_pos, face_pos)`` per axis (sum of two ``randint(0, r)`` draws minus ``r``),
    otherwise, when ``lo != hi`` and the (unscaled) face is at least 40 px and over a tenth of the short
    side, by ``randint(-j, j)`` with ``j = face_size // 20`` (symmetric; the reference's
    ``-face_size // 20`` floored one side). Axes are processed height first. Returns
    ``(crop, (left, top))`` in resized pixels; an image already exactly ``resolution`` is returned
    unchanged without any draw. Resizing uses :func:`resize_image` with ``interpolation``.
    """
    lo, hi = crop_range
    if lo > hi:
        raise ValueError(f"face_crop_aug_range must be lo <= hi, got {crop_range}")
    target_w, target_h = resolution
    height, width = image.shape[:2]
    if (width, height) == (target_w, target_h):
        return image, (0, 0)
    face_cx, face_cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    short_side = min(target_w, target_h)
    cover = max(target_h / height, target_w / width)
    min_scale = max(cover, min(1.0, short_side / (face_size * hi)))
    max_scale = max(min_scale, min(1.0, short_side / (face_size * lo)))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)

    new_h = max(target_h, int(height * scale + 0.5))
    new_w = max(target_w, int(width * scale + 0.5))
    if (new_w, new_h) != (width, height):
        image = resize_image(image, (new_w, new_h), interpolation)
    face_cx = int(face_cx * scale + 0.5)
    face_cy = int(face_cy * scale + 0.5)

    offsets: list[int] = []
    for target, length, face_pos in ((target_h, new_h, face_cy), (target_w, new_w, face_cx)):
        start = face_pos - target // 2
        if random_crop:
            spread = max(length - face_pos, face_pos)
            start += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif lo != hi and face_size > short_side // 10 and face_size >= 40:
            jitter = face_size // 20
            start += rng.randint(-jitter, jitter)
        offsets.append(max(0, min(start, length - target)))
    top, left = offsets
    crop = image[top : top + target_h, left : left + target_w]
    return np.ascontiguousarray(crop), (left, top)
