"""``--no_half_vae``: the VAE stays float32 under ``--mixed_precision fp16/bf16``.

kohya registers it in train_network.py, train_db.py, fine_tune.py and train_textual_inversion.py (not in
the XTI script) and moves the VAE to float32 instead of the mixed-precision dtype. Here that covers every
use of the VAE: latent caching (``--cache_latents`` / ``--cache_latents_to_disk``), encoding the images
of each step without a cache, the validation loss, and decoding sample images. kohya decodes samples
outside autocast; this trainer samples under autocast, so a float32 VAE also runs its encode and decode
with autocast turned off (:func:`keep_vae_in_float32`), or bf16/fp16 autocast would still compute them in
half precision.
"""

from __future__ import annotations

import argparse
import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used, so that parsing options stays light
    import torch

NO_HALF_VAE_SCRIPTS = ("train_network.py", "train_db.py", "fine_tune.py", "train_textual_inversion.py")


def add_no_half_vae_arguments(parser: argparse.ArgumentParser) -> None:
    """``--no_half_vae`` (for the scripts of :data:`NO_HALF_VAE_SCRIPTS`)."""
    parser.add_argument("--no_half_vae", action="store_true",
                        help="keep the VAE in float32 under --mixed_precision fp16/bf16 (latent caching, encoding "
                             "images without a cache, validation and sample images); the UNet and text encoder "
                             "still use the mixed-precision dtype")


def vae_dtype_for(weight_dtype: torch.dtype, no_half_vae: bool) -> torch.dtype:
    """The VAE's dtype: float32 with ``--no_half_vae``, else the mixed-precision ``weight_dtype``."""
    import torch

    return torch.float32 if no_half_vae else weight_dtype


def keep_vae_in_float32(vae: Any) -> None:
    """Make the VAE's ``encode`` and ``decode`` run in float32 even inside an autocast region: the input is
    cast to float32 and autocast is off for the call (the instance's methods are wrapped; idempotent)."""
    import torch

    if getattr(vae, "_sdtrain_float32", False):
        return
    for name in ("encode", "decode"):
        original = getattr(vae, name)

        @functools.wraps(original)
        def float32_call(x: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return _original(x.float(), *args, **kwargs)

        setattr(vae, name, float32_call)
    vae._sdtrain_float32 = True
