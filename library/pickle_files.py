"""Torch pickle files (``.pt`` / ``.ckpt``) in the form other tools load by default.

* :func:`standalone` gives a tensor that owns exactly its bytes. ``torch.save`` writes a tensor's whole
  storage, so a slice of a larger tensor (the new rows of a token-embedding table, say) would drag the
  whole table into the file: 150 MB instead of 8 KB for an SD1.5 embedding.
* :func:`save_pickle` writes torch's legacy (non-zip) serialization. AUTOMATIC1111's default safe
  unpickler (``modules/safe.py``) opens a zip archive only when every entry name is
  ``<dir>/data.pkl``, ``<dir>/version`` or ``<dir>/data/<n>`` (plus ``.data/serialization_id`` in newer
  versions), and the zip archives of current torch also hold ``.format_version``, ``.storage_alignment``
  and ``byteorder``, so it refuses them; the legacy form is five plain pickles followed by the raw
  storages, which it reads. The pickles reference only ``torch._utils._rebuild_tensor_v2``,
  ``torch.<Float|Half|BFloat16|...>Storage`` and ``collections.OrderedDict`` for tensors of plain
  dicts, all on its allow-list; ``torch.load(..., weights_only=True)`` reads the form too.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def standalone(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, on the CPU, contiguous, and a copy when it is a view into a larger storage."""
    tensor = tensor.detach().cpu().contiguous()
    own_bytes = tensor.numel() * tensor.element_size()
    if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != own_bytes:
        tensor = tensor.clone()
    return tensor


def save_pickle(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` in the legacy (non-zip) serialization (see the module docstring).

    Tensors in ``obj`` should be :func:`standalone` first; this function writes what it is given."""
    torch.save(obj, str(path), _use_new_zipfile_serialization=False)
