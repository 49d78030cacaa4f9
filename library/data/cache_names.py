"""Names of the ``--cache_latents_to_disk`` files: the reference's ``<stem>.npz`` wherever that is safe.

``<image path without extension>.npz`` (and ``…_flip.npz``) is what the reference reads and writes, so it
stays the default. It is not used for an image when

* another image of the same folder claims the same name (``foo.png`` and ``foo.jpg`` both map to
  ``foo.npz``; ``foo.png``'s mirrored twin ``foo_flip.npz`` is ``foo_flip.png``'s cache), or
* a file already sits at that name that is no latent cache (a user's own ``foo.npz``),

and the image's cache is then named after its whole file name: ``foo.png.npz`` / ``foo.png_flip.npz``.
When that name is taken by a foreign file too, the run stops with one line naming it; a file that is
not a latent cache is never replaced. Temporaries a killed caching run left behind are removed first.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from library.errors import UserError
from library.fileio import remove_leftovers
from library.output_safety import KIND_WORDS, classify


def _names(stem_or_name: str) -> tuple[str, str]:
    return f"{stem_or_name}.npz", f"{stem_or_name}_flip.npz"


def _foreign(folder: Path, name: str) -> bool:
    """True when a file that is not a latent cache sits at ``folder/name``."""
    return classify(folder / name) not in ("missing", "latents")


def latent_cache_paths(image_paths: Sequence[str | os.PathLike]) -> dict[Path, Path]:
    """The cache file of every image (see the module docstring); also removes stale temporaries."""
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for image in image_paths:
        image = Path(image)
        by_folder[image.parent].append(image)
    chosen: dict[Path, Path] = {}
    for folder, images in by_folder.items():
        claims = Counter(name for image in set(images) for name in _names(image.stem))
        taken: set[str] = set()
        for image in sorted(set(images)):
            preferred = _names(image.stem)
            names = preferred
            if any(claims[n] > 1 for n in preferred) or any(_foreign(folder, n) for n in preferred):
                names = _names(image.name)
                for name in names:
                    if claims[name] or name in taken:
                        raise UserError(f"latent cache for {image}: both {folder / preferred[0]} and "
                                        f"{folder / name} are claimed by other images; rename the image")
                    if _foreign(folder, name):
                        raise UserError(f"latent cache for {image}: {folder / preferred[0]} and {folder / name} "
                                        f"exist and are not latent caches ({KIND_WORDS[classify(folder / name)]}); "
                                        "they are left untouched — move them away to cache this image")
            taken.update(names)
            chosen[image] = folder / names[0]
        remove_leftovers(folder, taken)
    return chosen
