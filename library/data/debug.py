"""``--debug_dataset``: print every batch as it will be trained and write one contact sheet per batch.

Most users train on headless Linux, so instead of a window this writes PNG contact sheets (images with
their captions as trained) into a folder it names. Batches holding only cached latents are decoded with
the VAE when one is given, else drawn as placeholders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from library.data.dataset import DatasetGroup
from library.data.preview import batch_lines, render_contact_sheet, sheet_title, write_contact_sheet

logger = logging.getLogger(__name__)


def _pixels_for_sheet(batch: dict[str, Any], vae: Any) -> Any:
    if batch.get("images") is not None:
        return batch["images"]
    if vae is None or batch.get("latents") is None:
        return None
    with torch.no_grad():
        latents = batch["latents"].to(vae.device, vae.dtype)
        return vae.decode(latents).sample.float().clamp(-1, 1).cpu()


def run_debug_dataset(group: DatasetGroup, out_dir: str | Path, *, epochs: int = 1, max_batches: int | None = None,
                      vae: Any = None, print_fn=print) -> list[Path]:
    """Walk ``epochs`` epochs of ``group`` in training order; print each batch and write its contact sheet.

    Returns the written PNG paths. Nothing is trained and no training state changes.
    """
    out = Path(out_dir)
    written: list[Path] = []
    print_fn(f"debug_dataset: {len(group)} batch(es) per epoch; contact sheets go to {out}")
    for epoch in range(1, epochs + 1):
        for position, spec in enumerate(group.epoch_batches(epoch)):
            if max_batches is not None and position >= max_batches:
                break
            batch = group.load_batch(spec, epoch, position, step=0)
            if batch is None:
                print_fn(f"epoch {epoch} batch {position}: every image failed to load; skipped")
                continue
            for line in batch_lines(batch, position, epoch):
                print_fn(line)
            sheet = render_contact_sheet(_pixels_for_sheet(batch, vae), batch["captions"], batch["keys"],
                                         sheet_title(epoch, position, batch["bucket_reso"]))
            written.append(write_contact_sheet(sheet, out, epoch, position))
    print_fn(f"debug_dataset: wrote {len(written)} contact sheet(s) to {out}")
    return written
