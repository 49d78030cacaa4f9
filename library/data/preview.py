"""``--debug_dataset`` output: the text printed per batch and a contact-sheet PNG per batch.

The reference (kohya-ss/sd-scripts, training_behaviour.md §19) prints every item of every batch and, on
Windows only, opens an OpenCV window per image. Most training runs on headless Linux, so instead of a
window we render the whole batch as one contact sheet (every image as it is trained, with its key and its
processed caption underneath) and write it to a folder; the caller prints the path. No interactive
viewer is provided: open the PNGs with any image viewer, or copy them off the training machine.

Images arrive either as the training batch holds them (a float tensor ``(B, 3, H, W)`` in ``[-1, 1]``) or
as a list of ``(H, W, 3)`` uint8 arrays. A ``None`` entry (a batch that only carries cached latents and
was not decoded) is drawn as a grey placeholder labelled "latents only".

The grid geometry depends only on the item count, the thumbnail size and the font size (never on the
captions or the font actually loaded), so :func:`sheet_layout` tells exactly where everything lands.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from library.fileio import atomic_path

MAX_COLUMNS = 4
CAPTION_LINES = 8
PADDING = 6
ELLIPSIS = "..."
PLACEHOLDER_TEXT = "latents only"
EOS_TOKEN_ID = 49407

_BACKGROUND = (255, 255, 255)
_THUMB_BACKGROUND = (232, 232, 232)
_PLACEHOLDER = (128, 128, 128)
_BORDER = (200, 200, 200)
_TEXT = (0, 0, 0)
_KEY_TEXT = (30, 60, 150)
_TITLE_BACKGROUND = (40, 40, 40)
_TITLE_TEXT = (255, 255, 255)

_Font = Any  # ImageFont.FreeTypeFont or the legacy bitmap ImageFont.ImageFont


# --------------------------------------------------------------------------------------------- text


def batch_lines(batch: dict, batch_index: int, epoch: int) -> list[str]:
    """Return the lines ``--debug_dataset`` prints for one batch.

    ``batch`` holds ``keys``, ``bucket_reso`` ``(w, h)``, ``captions`` (as trained), ``loss_weights`` and
    optionally ``original_sizes``, ``flipped`` and ``input_ids`` (``(B, n, 77)``). Optional fields that are
    absent are left out of the item lines. Input ids are printed per chunk up to the first end-of-text
    token, with the count of padding ids that follow.
    """
    keys = list(batch["keys"])
    captions = list(batch.get("captions") or [""] * len(keys))
    raw_weights = batch.get("loss_weights")
    weights = [float(w) for w in raw_weights] if raw_weights is not None else [1.0] * len(keys)
    sizes = batch.get("original_sizes")
    flipped = batch.get("flipped")
    input_ids = batch.get("input_ids")
    reso = tuple(int(v) for v in batch["bucket_reso"])

    lines = [f"epoch {epoch} batch {batch_index} bucket {reso} size {len(keys)}"]
    for i, key in enumerate(keys):
        parts = [f"  [{i}] key={key}"]
        if sizes is not None:
            parts.append(f"size={tuple(int(v) for v in sizes[i])}")
        parts.append(f"weight={float(weights[i])!r}")
        if flipped is not None:
            parts.append(f"flip={'yes' if flipped[i] else 'no'}")
        parts.append(f"caption: {json.dumps(captions[i], ensure_ascii=False)}")
        lines.append("  ".join(parts))
        if input_ids is not None:
            lines.extend(_input_id_lines(input_ids[i]))
    return lines


def _input_id_lines(ids: Any) -> list[str]:
    """Format one item's token ids (``(n, 77)`` or ``(77,)``), one line per chunk."""
    rows = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if rows and not isinstance(rows[0], list):
        rows = [rows]
    out = []
    for chunk, row in enumerate(rows):
        row = [int(v) for v in row]
        end = row.index(EOS_TOKEN_ID) + 1 if EOS_TOKEN_ID in row else len(row)
        pad = len(row) - end
        tail = f" (+{pad} pad)" if pad else ""
        out.append(f"      input_ids[{chunk}]: {row[:end]}{tail}")
    return out


def sheet_title(epoch: int, batch_index: int, bucket_reso: Sequence[int]) -> str:
    """The contact-sheet title for a batch, e.g. ``"epoch 1 batch 3 bucket 512x384"``."""
    width, height = (int(v) for v in bucket_reso)
    return f"epoch {epoch} batch {batch_index} bucket {width}x{height}"


# ------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class SheetLayout:
    """Geometry of a contact sheet: a title bar, then a grid of equally sized cells.

    Each cell is ``PADDING`` + a ``thumb`` x ``thumb`` picture square + ``PADDING`` + one key line +
    ``caption_lines`` caption lines + ``PADDING`` tall, and ``thumb + 2 * PADDING`` wide.
    """

    count: int
    columns: int
    rows: int
    thumb: int
    line_height: int
    caption_lines: int = CAPTION_LINES

    @property
    def title_height(self) -> int:
        """Height of the title bar at the top of the sheet."""
        return self.line_height + 2 * PADDING

    @property
    def cell_width(self) -> int:
        """Width of one grid cell."""
        return self.thumb + 2 * PADDING

    @property
    def cell_height(self) -> int:
        """Height of one grid cell."""
        return 3 * PADDING + self.thumb + (1 + self.caption_lines) * self.line_height

    @property
    def width(self) -> int:
        """Width of the whole sheet."""
        return self.columns * self.cell_width

    @property
    def height(self) -> int:
        """Height of the whole sheet."""
        return self.title_height + self.rows * self.cell_height

    def cell_origin(self, index: int) -> tuple[int, int]:
        """Top-left corner of cell ``index`` (row-major order)."""
        row, col = divmod(index, self.columns)
        return col * self.cell_width, self.title_height + row * self.cell_height

    def thumb_origin(self, index: int) -> tuple[int, int]:
        """Top-left corner of the picture square of cell ``index``."""
        x, y = self.cell_origin(index)
        return x + PADDING, y + PADDING

    def image_box(self, index: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Where an image of ``size`` ``(w, h)`` lands in cell ``index``: ``(left, top, width, height)``.

        The image is scaled (up or down) to fit the picture square, keeping its aspect ratio, and centred.
        """
        width, height = fit_size(size, self.thumb)
        x, y = self.thumb_origin(index)
        return x + (self.thumb - width) // 2, y + (self.thumb - height) // 2, width, height

    def text_origin(self, index: int) -> tuple[int, int]:
        """Top-left corner of the key line of cell ``index`` (the caption lines follow it)."""
        x, y = self.thumb_origin(index)
        return x, y + self.thumb + PADDING


def fit_size(size: tuple[int, int], thumb: int) -> tuple[int, int]:
    """Scale ``size`` ``(w, h)`` to fit a ``thumb`` x ``thumb`` square, keeping the aspect ratio."""
    width, height = (max(1, int(v)) for v in size)
    scale = thumb / max(width, height)
    return max(1, min(thumb, round(width * scale))), max(1, min(thumb, round(height * scale)))


def sheet_layout(count: int, thumb: int = 256, *, font_size: int = 12) -> SheetLayout:
    """The layout of a sheet of ``count`` items: up to ``MAX_COLUMNS`` columns, as many rows as needed."""
    if thumb < 1:
        raise ValueError(f"thumb must be positive, got {thumb}")
    columns = max(1, min(MAX_COLUMNS, count))
    rows = math.ceil(count / columns) if count > 0 else 0
    return SheetLayout(count=count, columns=columns, rows=rows, thumb=thumb, line_height=font_size + 4)


# ------------------------------------------------------------------------------------------- images


def _to_rgb_array(image: Any) -> np.ndarray | None:
    """One image as an ``(H, W, 3)`` uint8 array; floats (tensor or array) are taken as ``[-1, 1]``."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    channels_first = hasattr(image, "detach")
    if channels_first:  # a torch tensor, (C, H, W)
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3 and channels_first:
        array = np.transpose(array, (1, 2, 0))
    if array.ndim != 3:
        raise ValueError(f"expected an image of 2 or 3 dimensions, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
        array = np.clip(np.round((array + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def _image_list(images: Any, count: int) -> list[np.ndarray | None]:
    """Normalise the ``images`` argument of :func:`render_contact_sheet` to a list of arrays/None."""
    if images is None:
        return [None] * count
    if hasattr(images, "detach") and images.ndim == 4:
        images = list(images)
    items = [_to_rgb_array(image) for image in images]
    if len(items) != count:
        raise ValueError(f"got {len(items)} images for {count} keys")
    return items


# --------------------------------------------------------------------------------------------- font


def _load_font(size: int) -> _Font:
    """Pillow's default font at ``size`` (Pillow >= 10.1), else its fixed-size bitmap default."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):  # old Pillow, or no FreeType support
        return ImageFont.load_default()


def _latin1(text: str) -> str:
    """``text`` with characters a latin-1 bitmap font cannot draw replaced by ``?``."""
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_length(font: _Font, text: str) -> float:
    """Rendered width of ``text``; never raises for characters the font lacks."""
    for candidate in (text, _latin1(text)):
        try:
            return float(font.getlength(candidate))
        except (UnicodeError, ValueError, OSError, AttributeError):
            continue
    return float(len(text) * 7)


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: _Font, fill: tuple) -> None:
    """Draw ``text``, degrading to ``?`` for glyphs the font cannot encode instead of raising."""
    for candidate in (text, _latin1(text), text.encode("ascii", "replace").decode("ascii")):
        try:
            draw.text(xy, candidate, font=font, fill=fill)
            return
        except (UnicodeError, ValueError, OSError):
            continue


def wrap_text(text: str, font: _Font, width: int, max_lines: int = CAPTION_LINES) -> list[str]:
    """Wrap ``text`` into lines at most ``width`` pixels wide, at most ``max_lines`` of them.

    Breaks at whitespace; a run without whitespace (long tags, CJK text) that does not fit is broken
    between characters. When the text needs more lines, the last kept line ends with ``"..."``.
    """

    def fits(line: str) -> bool:
        return _text_length(font, line) <= width

    lines: list[str] = []
    current = ""
    for token in re.findall(r"\S+\s*", " ".join(text.split())):
        if fits((current + token).rstrip()):
            current += token
            continue
        if current:
            lines.append(current.rstrip())
            current = ""
        while token.strip() and not fits(token.rstrip()):
            cut = 1
            while cut < len(token) and fits(token[: cut + 1]):
                cut += 1
            lines.append(token[:cut])
            token = token[cut:]
            if len(lines) > max_lines:
                break
        current = token
        if len(lines) > max_lines:
            break
    if current.strip():
        lines.append(current.rstrip())
    if len(lines) <= max_lines:
        return lines
    kept = lines[:max_lines]
    last = kept[-1]
    while last and not fits(last + ELLIPSIS):
        last = last[:-1]
    kept[-1] = last.rstrip() + ELLIPSIS
    return kept


def _fit_one_line(text: str, font: _Font, width: int) -> str:
    """``text`` shortened with a trailing ``"..."`` so that it fits on one line."""
    if _text_length(font, text) <= width:
        return text
    while text and _text_length(font, text + ELLIPSIS) > width:
        text = text[:-1]
    return text + ELLIPSIS


# ------------------------------------------------------------------------------------------- render


def render_contact_sheet(
    images: Any,
    captions: Sequence[str],
    keys: Sequence[str],
    title: str,
    *,
    thumb: int = 256,
    font_size: int = 12,
) -> Image.Image:
    """Draw a batch as one RGB contact sheet: a title bar, then a grid of up to four columns.

    ``images`` is a float tensor ``(B, 3, H, W)`` in ``[-1, 1]``, a sequence of ``(H, W, 3)`` uint8 arrays
    (``None`` entries allowed: drawn as a grey "latents only" placeholder), or ``None`` for all
    placeholders. Every cell shows the image scaled to fit ``thumb`` x ``thumb`` (aspect kept), the key's
    file name, and the caption wrapped to the cell width (at most ``CAPTION_LINES`` lines, then
    ``"..."``). Characters the font cannot draw are replaced, never raised on. The geometry is
    :func:`sheet_layout` ``(len(keys), thumb, font_size=font_size)``.
    """
    keys = [str(k) for k in keys]
    captions = [str(c) for c in captions]
    if len(captions) != len(keys):
        raise ValueError(f"got {len(captions)} captions for {len(keys)} keys")
    arrays = _image_list(images, len(keys))
    layout = sheet_layout(len(keys), thumb, font_size=font_size)
    font = _load_font(font_size)

    sheet = Image.new("RGB", (layout.width, layout.height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.rectangle((0, 0, layout.width - 1, layout.title_height - 1), fill=_TITLE_BACKGROUND)
    _draw_text(draw, (PADDING, PADDING), _fit_one_line(title, font, layout.width - 2 * PADDING), font,
               _TITLE_TEXT)

    text_width = layout.thumb
    for index, (array, key, caption) in enumerate(zip(arrays, keys, captions)):
        cx, cy = layout.cell_origin(index)
        draw.rectangle((cx, cy, cx + layout.cell_width - 1, cy + layout.cell_height - 1), outline=_BORDER)
        tx, ty = layout.thumb_origin(index)
        square = (tx, ty, tx + thumb - 1, ty + thumb - 1)
        if array is None:
            draw.rectangle(square, fill=_PLACEHOLDER)
            label_w = _text_length(font, PLACEHOLDER_TEXT)
            label_xy = (tx + int((thumb - label_w) // 2), ty + (thumb - layout.line_height) // 2)
            _draw_text(draw, label_xy, PLACEHOLDER_TEXT, font, _TITLE_TEXT)
        else:
            draw.rectangle(square, fill=_THUMB_BACKGROUND)
            height, width = array.shape[:2]
            left, top, new_w, new_h = layout.image_box(index, (width, height))
            picture = Image.fromarray(array, "RGB")
            if (new_w, new_h) != (width, height):
                shrinking = new_w < width
                resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.NEAREST
                picture = picture.resize((new_w, new_h), resample)
            sheet.paste(picture, (left, top))

        x, y = layout.text_origin(index)
        name = Path(key).name or key
        _draw_text(draw, (x, y), _fit_one_line(name, font, text_width), font, _KEY_TEXT)
        for line_no, line in enumerate(wrap_text(caption, font, text_width, layout.caption_lines)):
            _draw_text(draw, (x, y + (line_no + 1) * layout.line_height), line, font, _TEXT)
    return sheet


def sheet_path(folder: Path, epoch: int, batch_index: int) -> Path:
    """The file a batch's contact sheet is written to: ``folder/epoch{EEE}_batch{BBBBB}.png``."""
    return Path(folder) / f"epoch{epoch:03d}_batch{batch_index:05d}.png"


def write_contact_sheet(sheet: Image.Image, folder: Path, epoch: int, batch_index: int) -> Path:
    """Write ``sheet`` as a PNG to :func:`sheet_path` atomically (the folder is created) and return it."""
    target = sheet_path(folder, epoch, batch_index)
    with atomic_path(target) as tmp:
        sheet.save(tmp, format="PNG")
    return target
