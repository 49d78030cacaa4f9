"""Putting a model on a device in a dtype."""

from __future__ import annotations

from typing import Any

import torch


def place(module: Any, device: Any, dtype: torch.dtype) -> None:
    """Move a model to ``device`` and cast it only when its dtype differs (diffusers warns on any cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
