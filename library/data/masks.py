"""Per-pixel loss masks (docs/masked_loss.md): from a folder of mask images or the image's alpha channel.

A subset gets masks from ``conditioning_data_dir`` (a greyscale image per training image, same file stem;
the red channel of a colour image is used, as sd-scripts does) when ``--masked_loss`` is given, or from
the alpha channel of its own images with ``alpha_mask`` (which turns masking on by itself, as in
sd-scripts). White (255) trains fully, black (0) not at all, grey in between. Subsets without a source
get an all-ones mask.

The mask goes through exactly the geometry of its image: on the pixel path it rides as a 4th channel
through the same resize (OpenCV INTER_AREA), crop (centre, random or face crop) and flip; with cached
latents it is rebuilt from the mask source, the image's bucket and the centre crop the latent was made
from (cached latents never use random or face crops), mirrored when the mirrored latent is drawn, and
memoised in memory. Either way it is then area-averaged to the latent size (1/8) and the batch carries it
as ``batch["masks"]`` of shape (B, 1, h, w) in [0, 1]; the loop multiplies the element loss by it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from library.data.images import (ImageLoadError, _apply_orientation, _header_orientation, _open_checked,
                                 is_image_file, load_image_rgb, read_image_size, resize_and_crop)
from library.errors import UserError

logger = logging.getLogger(__name__)

LATENT_FACTOR = 8
ASPECT_TOLERANCE = 0.01  # a mask may have another size than its image, but (within 1 %) the same aspect


@dataclass(frozen=True)
class MaskSpec:
    """Where one subset's masks come from: a folder of mask images (wins) or the alpha channel."""

    folder: str | None
    alpha: bool


def _alpha_plane(path: str) -> np.ndarray:
    """The alpha channel (H, W) uint8 of an image, upright per EXIF; all 255 when it has none."""
    im = _open_checked(Path(path))
    try:
        with im:
            orientation = _header_orientation(im)
            if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
                alpha = np.asarray(im.convert("RGBA"))[:, :, 3:4]
            else:
                width, height = im.size
                alpha = np.full((height, width, 1), 255, dtype=np.uint8)
    except ImageLoadError:
        raise
    except Exception as exc:  # Pillow's decode errors
        raise ImageLoadError(path, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from exc
    return _apply_orientation(alpha, orientation)[:, :, 0]


def _list_masks(folder: str) -> dict[str, str]:
    """``{stem: file name}`` of the images in a mask folder (the first name wins for a repeated stem)."""
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if is_image_file(name):
            out.setdefault(os.path.splitext(name)[0], name)
    return out


class MaskSource:
    """Builds each sample's latent-size loss mask; picklable (it travels into DataLoader workers)."""

    def __init__(self, specs: dict[Any, MaskSpec]):
        """``specs`` maps a blueprint subset to its :class:`MaskSpec`; other subsets get all-ones masks."""
        self.specs = specs
        self._listings: dict[str, dict[str, str]] = {}
        self._memo: dict[tuple, torch.Tensor] = {}

    def mask_path(self, folder: str, image_path: str) -> str | None:
        """The mask file for ``image_path`` in ``folder`` (same stem), or None when there is none."""
        if folder not in self._listings:
            self._listings[folder] = _list_masks(folder)
        name = self._listings[folder].get(os.path.splitext(os.path.basename(image_path))[0])
        return None if name is None else os.path.join(folder, name)

    def plane(self, subset: Any, image_path: str, size: tuple[int, int]) -> np.ndarray:
        """The full-size mask (H, W) uint8 of an image of displayed ``size`` (width, height)."""
        spec = self.specs.get(subset)
        width, height = size
        if spec is None:
            return np.full((height, width), 255, dtype=np.uint8)
        if spec.folder is not None:
            path = self.mask_path(spec.folder, image_path)
            if path is None:  # checked at start-up; the folder changed since
                raise ImageLoadError(image_path, f"its mask image is missing from {spec.folder}")
            plane = load_image_rgb(path, alpha_background=None)[:, :, 0]
        else:
            plane = _alpha_plane(image_path)
        if plane.shape != (height, width):
            plane = cv2.resize(np.ascontiguousarray(plane), (width, height), interpolation=cv2.INTER_AREA)
        return plane

    def attach(self, image: np.ndarray, subset: Any, image_path: str) -> np.ndarray:
        """``image`` (H, W, 3) with its mask as a 4th channel, to be resized, cropped and flipped with it."""
        plane = self.plane(subset, image_path, (image.shape[1], image.shape[0]))
        return np.ascontiguousarray(np.dstack([image, plane]))

    @staticmethod
    def detach(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split an :meth:`attach` result back into the RGB image and the mask plane."""
        return np.ascontiguousarray(image[:, :, :3]), np.ascontiguousarray(image[:, :, 3])

    @staticmethod
    def to_latent(plane: np.ndarray, flipped: bool) -> torch.Tensor:
        """A cropped mask plane (mirrored when ``flipped``) as (1, h/8, w/8) float32 in [0, 1] (area mean)."""
        if flipped:
            plane = plane[:, ::-1]
        mask = torch.from_numpy(np.ascontiguousarray(plane)).float().div_(255.0)[None, None]
        size = (max(1, plane.shape[0] // LATENT_FACTOR), max(1, plane.shape[1] // LATENT_FACTOR))
        return F.interpolate(mask, size=size, mode="area")[0]

    def fixed_crop_mask(self, subset: Any, entry: Any, assignment: Any, flipped: bool) -> torch.Tensor:
        """The mask of a sample trained from cached latents: the centre crop of its bucket (memoised)."""
        key = (subset, entry.path, assignment.bucket, assignment.resized_size, flipped)
        mask = self._memo.get(key)
        if mask is None:
            plane = self.plane(subset, entry.path, entry.size)
            crop, _ = resize_and_crop(plane, assignment.bucket, assignment.resized_size)
            mask = self._memo[key] = self.to_latent(crop, flipped)
        return mask


def _subset_name(index: int, sub_index: int, subset: Any) -> str:
    where = subset.image_dir or subset.metadata_file
    return f"datasets[{index}].subsets[{sub_index}] ({where})"


def _subset_spec(subset: Any, name: str, *, masked_loss: bool, conditioning_data_dir: str | None) -> MaskSpec | None:
    """A subset's mask source: its own conditioning_data_dir, else --conditioning_data_dir for training
    (non-regularization) subsets, only with --masked_loss; else its alpha channel with alpha_mask."""
    folder = subset.conditioning_data_dir or (None if subset.is_reg else conditioning_data_dir)
    if folder and not masked_loss:
        logger.warning("%s: conditioning_data_dir is ignored without --masked_loss", name)
        folder = None
    if folder and not Path(folder).is_dir():
        raise UserError(f"{name}: conditioning_data_dir '{folder}' does not exist or is not a folder")
    if folder and subset.alpha_mask:
        logger.info("%s: both alpha_mask and conditioning_data_dir are set; the mask images are used", name)
    if folder or subset.alpha_mask:
        return MaskSpec(folder=folder or None, alpha=not folder)
    return None


def _groups(group: Any) -> list[Any]:
    """The group and its held-out validation group, when it has one."""
    return [group] + ([group.validation] if getattr(group, "validation", None) is not None else [])


def _check_mask_files(source: MaskSource, group: Any) -> None:
    """Every image of a mask-folder subset has a mask of its aspect ratio (one error listing the first)."""
    missing: list[str] = []
    for ds in (d for g in _groups(group) for d in g.datasets):
        for entry in ds.entries:
            spec = source.specs.get(ds.blueprint.subsets[entry.subset_index])
            if spec is None or spec.folder is None or entry.path is None:
                continue
            path = source.mask_path(spec.folder, entry.path)
            if path is None:
                missing.append(f"{os.path.basename(entry.path)} (in {spec.folder})")
                continue
            try:
                mw, mh = read_image_size(path)
            except ImageLoadError as exc:
                raise UserError(f"masked loss: mask image {path} cannot be read ({exc.reason})") from None
            width, height = entry.size
            if abs(mw / mh - width / height) > ASPECT_TOLERANCE * (width / height):
                raise UserError(f"masked loss: mask image {path} is {mw}x{mh} but its image {entry.path} is "
                                f"{width}x{height}; a mask must have its image's size (or at least aspect ratio)")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"masked loss: no mask image for {len(missing)} training image(s): {', '.join(missing[:3])}"
                        f"{more}; a mask image has the same file stem as its image (e.g. img1.png for img1.jpg)")


def mask_source_for(group: Any, *, masked_loss: bool, conditioning_data_dir: str | None) -> MaskSource | None:
    """The run's :class:`MaskSource` (None without masks), after checking every mask file exists.
    ``masked_loss``: --masked_loss; ``conditioning_data_dir``: --conditioning_data_dir (the mask folder of
    every training subset that sets none).

    Raises UserError for ``--masked_loss`` without any mask source, a missing mask folder or file, or a
    mask whose aspect ratio differs from its image's.
    """
    specs: dict[Any, MaskSpec] = {}
    visited: set[int] = set()
    for i, ds in enumerate(d for g in _groups(group) for d in g.datasets):
        for j, subset in enumerate(ds.blueprint.subsets):
            if id(subset) in visited:  # validation datasets share their subsets
                continue
            visited.add(id(subset))
            spec = _subset_spec(subset, _subset_name(i, j, subset), masked_loss=masked_loss,
                                conditioning_data_dir=conditioning_data_dir)
            if spec is not None:
                specs[subset] = spec
    if not specs:
        if masked_loss:
            raise UserError("--masked_loss needs masks: set conditioning_data_dir (a folder of mask images) or "
                            "alpha_mask = true in a [[datasets.subsets]] of the dataset config, or give "
                            "--conditioning_data_dir or --alpha_mask")
        return None
    source = MaskSource(specs)
    _check_mask_files(source, group)
    if not masked_loss:
        logger.info("alpha_mask is set: the loss is weighted by the images' alpha channel (as with --masked_loss)")
    return source


def attach_mask_source(group: Any, *, masked_loss: bool, conditioning_data_dir: str | None) -> None:
    """Set ``group.masks`` (and its validation group's) from --masked_loss, --conditioning_data_dir and the
    dataset config (see :func:`mask_source_for`)."""
    source = mask_source_for(group, masked_loss=masked_loss, conditioning_data_dir=conditioning_data_dir)
    for g in _groups(group):
        g.masks = source
