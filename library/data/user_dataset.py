"""``--dataset_class package.module.Class``: a user's dataset makes the batches instead of the dataset config.

As in the reference, the class is imported by its dotted name and built as
``Class(tokenizer, max_token_length, resolution, debug_dataset)`` (``resolution`` as ``(width, height)``
or None). It is a map-style dataset of *batches*: ``len(ds)`` batches per epoch and ``ds[i]`` a dict with

* ``"captions"``: a list of strings, one per sample (tokenized here, so ``--max_token_length``,
  ``--weighted_captions`` and Textual Inversion's token expansion apply; an ``"input_ids"`` entry is
  ignored);
* ``"images"``: a float tensor ``[B, 3, H, W]`` in ``[-1, 1]`` (H and W multiples of 8), or
  ``"latents"``: ``[B, 4, H/8, W/8]`` VAE latents, unscaled;
* optionally ``"loss_weights"`` ``[B]`` (default 1) and ``"image_keys"`` (names for messages).

Optional hooks the reference calls are called too: ``set_current_epoch(epoch)``, ``set_current_step(step)``
and ``set_max_train_steps(steps)``. The batch order of an epoch is a permutation of ``range(len(ds))``
seeded with (seed, epoch), so a resumed run continues exactly when the class itself is deterministic.
:class:`UserDatasetGroup` gives the trainer the same interface as :class:`library.data.dataset.DatasetGroup`.
"""

from __future__ import annotations

import importlib
import logging
import random
from collections.abc import Mapping
from typing import Any

import torch

from library.config.blueprint import DatasetBlueprint
from library.data.captions import apply_replacements
from library.data.dataset import BatchSpec
from library.data.tokens import tokenize_caption, tokenize_weighted_captions
from library.errors import UserError

logger = logging.getLogger(__name__)

ITEM_RULE = ("a dict with 'captions' (list of str) and 'images' [B, 3, H, W] in [-1, 1] or 'latents' "
             "[B, 4, H/8, W/8]")


def import_dataset_class(name: str) -> type:
    """The class named ``package.module.Class``; one UserError line when it cannot be imported."""
    module_name, _, class_name = name.strip().rpartition(".")
    if not module_name or not class_name:
        raise UserError(f"--dataset_class must be 'package.module.Class', got '{name}'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or any error raised while the module runs
        raise UserError(f"--dataset_class {name}: cannot import module '{module_name}' "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "is its folder on PYTHONPATH?") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserError(f"--dataset_class {name}: module '{module_name}' has no class '{class_name}'")
    missing = [m for m in ("__len__", "__getitem__") if not callable(getattr(cls, m, None))]
    if missing:
        raise UserError(f"--dataset_class {name}: the class has no {' or '.join(missing)}; it must be a map-style "
                        f"dataset of batches (len = batches per epoch, item = {ITEM_RULE})")
    return cls


class UserDatasetGroup:
    """A ``--dataset_class`` dataset behind the interface the trainer uses (epoch_batches / load_batch)."""

    validation = None  # no held-out images
    masks = None  # no loss masks
    precomputed_ok = False

    def __init__(self, dataset: Any, *, name: str, seed: int, tokenizer: Any, max_token_length: int | None,
                 weighted_captions: bool):
        """Wrap ``dataset`` (built from the class ``name``) for a run with ``seed``."""
        self.dataset, self.name, self.seed = dataset, name, seed
        self.tokenizer, self.max_token_length, self.weighted_captions = tokenizer, max_token_length, weighted_captions
        self.datasets: list[Any] = []  # no image folders: metadata and summaries list none
        self.latents: dict = {}
        self.replacements: dict[str, str | list[str]] | None = None
        try:
            self._length = int(len(dataset))
        except Exception as exc:  # noqa: BLE001 - the user's __len__
            raise UserError(f"--dataset_class {name}: len() failed ({type(exc).__name__}: {exc})") from None
        if self._length < 1:
            raise UserError(f"--dataset_class {name}: the dataset has no batches (len() is {self._length})")

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._length

    @property
    def num_images(self) -> int:
        """The class's ``num_train_images`` when it has one, else the batch count."""
        return int(getattr(self.dataset, "num_train_images", 0) or self._length)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """Forward to the class's ``set_max_train_steps`` when it has one."""
        hook = getattr(self.dataset, "set_max_train_steps", None)
        if callable(hook):
            hook(max_train_steps)

    def epoch_batches(self, epoch: int) -> list[BatchSpec]:
        """The batch indices of ``epoch`` in training order: shuffled with a generator of (seed, epoch)."""
        order = list(range(self._length))
        random.Random(f"sdtrain-user-batches:{self.seed}:{epoch}").shuffle(order)
        return [BatchSpec(0, (0, 0), (index,)) for index in order]

    def mark_failed(self, key: str) -> None:
        """Nothing to leave out: the class decides what its batches hold."""

    def uses_latents(self, dataset_index: int, entry_index: int) -> bool:
        """No entries are cached here."""
        return False

    def summary_lines(self) -> list[str]:
        """The start-up report."""
        return [f"[dataset] --dataset_class {self.name}: {self._length} batch(es) per epoch"]

    def load_batch(self, spec: BatchSpec, epoch: int, position: int, step: int = 0) -> dict[str, Any]:
        """The class's batch ``spec.items[0]``, checked and tokenized."""
        index = spec.items[0]
        for hook, value in (("set_current_epoch", epoch), ("set_current_step", step)):
            if callable(getattr(self.dataset, hook, None)):
                getattr(self.dataset, hook)(value)
        example = self.dataset[index]
        images, latents, captions = self._checked(example, index)
        count = len(captions)
        if self.replacements:
            rng = random.Random(f"sdtrain-user-batch:{self.seed}:{epoch}:{position}")
            captions = [apply_replacements(c, self.replacements, rng) for c in captions]
        weights = example.get("loss_weights")
        weights = torch.ones(count) if weights is None else torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if weights.numel() != count:
            raise UserError(f"--dataset_class {self.name}: item {index} has {weights.numel()} loss_weights for "
                            f"{count} captions")
        pixels = images if images is not None else latents
        keys = [str(k) for k in example.get("image_keys") or [f"{self.name}[{index}][{i}]" for i in range(count)]]
        batch: dict[str, Any] = {
            "keys": keys, "bucket_reso": (pixels.shape[-1] * (1 if images is not None else 8),
                                          pixels.shape[-2] * (1 if images is not None else 8)),
            "captions": captions, "flipped": [False] * count, "original_sizes": [None] * count,
            "is_reg": [False] * count, "loss_weights": weights.float(), "custom_attributes": [{}] * count,
            "images": images, "latents": latents}
        if self.weighted_captions:
            batch["input_ids"], batch["token_weights"] = tokenize_weighted_captions(self.tokenizer, captions,
                                                                                    self.max_token_length)
        else:
            batch["input_ids"] = torch.stack([tokenize_caption(self.tokenizer, c, self.max_token_length)
                                              for c in captions])
        return batch

    def _checked(self, example: Any, index: int) -> tuple[Any, Any, list[str]]:
        """``(images, latents, captions)`` of one item, or one UserError line saying what is wrong."""
        def bad(why: str) -> UserError:
            return UserError(f"--dataset_class {self.name}: item {index} must be {ITEM_RULE}; {why}")

        if not isinstance(example, Mapping):
            raise bad(f"got {type(example).__name__}")
        captions = example.get("captions")
        if not isinstance(captions, (list, tuple)) or not captions or not all(isinstance(c, str) for c in captions):
            raise bad("'captions' is missing or not a non-empty list of strings")
        images, latents = example.get("images"), example.get("latents")
        if (images is None) == (latents is None):
            raise bad("give exactly one of 'images' and 'latents'")
        tensor = images if images is not None else latents
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4 or not tensor.is_floating_point():
            raise bad(f"'{'images' if images is not None else 'latents'}' is not a 4-D float tensor")
        channels, unit = (3, 8) if images is not None else (4, 1)
        if tensor.shape[0] != len(captions) or tensor.shape[1] != channels or tensor.shape[2] % unit or \
                tensor.shape[3] % unit:
            raise bad(f"got shape {tuple(tensor.shape)} for {len(captions)} caption(s)")
        return images, latents, list(captions)


def load_user_dataset(name: str, *, tokenizer: Any, max_token_length: int | None, resolution: Any,
                      debug_dataset: bool, seed: int, weighted_captions: bool
                      ) -> tuple[DatasetBlueprint, UserDatasetGroup]:
    """Import and build the ``--dataset_class`` dataset; returns an empty blueprint (no image folders)
    named after the class, and the group the trainer reads."""
    cls = import_dataset_class(name)
    try:
        dataset = cls(tokenizer, max_token_length, resolution, debug_dataset)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's constructor
        raise UserError(f"--dataset_class {name}: {name.rpartition('.')[2]}(tokenizer, max_token_length, resolution, "
                        f"debug_dataset) failed ({type(exc).__name__}: {exc})") from None
    group = UserDatasetGroup(dataset, name=name, seed=seed, tokenizer=tokenizer, max_token_length=max_token_length,
                             weighted_captions=weighted_captions)
    for line in group.summary_lines():
        logger.info("%s", line)
    return DatasetBlueprint((), source=f"--dataset_class {name}"), group
