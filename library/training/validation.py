"""Validation loss: a fixed measure of how well the model fits images it never trains on.

Held-out images come from ``--validation_split`` / ``validation_split`` (a share of each dataset's
training images, picked by ``validation_seed``, default the run seed) or from whole datasets marked
``is_validation = true`` in the dataset config. They are read without any randomness (centre crop, no
flip, colour or crop augmentation, captions as written: no shuffle, dropout or token warm-up) and
their latents are cached when the run caches latents.

The loss of an image is the plain mean squared error of the model's prediction (ε or v) at the fixed
timesteps :data:`VALIDATION_TIMESTEPS`, with noise drawn from a generator of its own seeded by
(validation seed, image file name). No loss weighting (min-SNR, prior loss weight, loss type) and no
noise variant (offset, pyramid) applies, so the curve is comparable over a run and across runs with
different training options. It runs under ``torch.no_grad`` with the trained modules in eval mode and
never draws from the training generator or a global RNG: a run with validation trains bit-identical
weights to the same run without it. Each image goes through the model on its own (one image per forward
pass), so the value does not depend on the training batch size. With several processes each computes
every ``world``-th image and the sums are all-reduced, so it does not depend on the process count either;
with sharded weights (ZeRO-3, FSDP2) each makes one forward pass per round, a stand-in where it has no image.
See docs/validation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from library.errors import UserError
from library.option_groups import LossOptions, ValidationOptions

if TYPE_CHECKING:  # torch is imported where it is used, so that building the option parser stays quick
    import torch

logger = logging.getLogger(__name__)

VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)
LOG_KEY = "loss/validation"


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--validation_split``, ``--validation_seed``, ``--validate_every_n_steps``, ``--validate_every_n_epochs``."""
    g = parser.add_argument_group("validation loss (docs/validation.md)")
    a = g.add_argument
    a("--validation_split", type=float, default=None,
      help="share of each dataset's training images held out for the validation loss (e.g. 0.1); "
           "the dataset config key 'validation_split' overrides it per dataset")
    a("--validation_seed", type=int, default=None,
      help="seed that picks the held-out images and their fixed noise (default: the run seed)")
    a("--validate_every_n_steps", type=int, default=None, help="compute the validation loss every N optimizer steps")
    a("--validate_every_n_epochs", type=int, default=None,
      help="compute the validation loss every N epochs (default with a validation set and neither option: 1)")


def add_max_validation_steps_argument(parser: argparse.ArgumentParser) -> None:
    """``--max_validation_steps`` (train_network.py only, as in kohya), beside the other validation options."""
    title = "validation loss (docs/validation.md)"
    group = next((g for g in parser._action_groups if g.title == title), None) or parser.add_argument_group(title)
    group.add_argument(
        "--max_validation_steps", type=int, default=None,
        help="compute the validation loss over the first N validation batches only (default: all of them)")


def validation_problems(args: argparse.Namespace) -> list[str]:
    """Range problems of --validation_split, --validation_seed, --validate_every_n_steps and
    --validate_every_n_epochs (for the up-front option check; every training script has them)."""
    problems = []
    split = args.validation_split
    if split is not None and not 0.0 <= split < 1.0:
        problems.append(f"--validation_split must be at least 0 and below 1, got {split:g}")
    seed = args.validation_seed
    if seed is not None and seed < 0:
        problems.append(f"--validation_seed must be at least 0, got {seed}")
    for name in ("validate_every_n_steps", "validate_every_n_epochs"):
        value = vars(args)[name]
        if value is not None and value < 1:
            problems.append(f"--{name} must be at least 1, got {value}")
    return problems


# --------------------------------------------------------------------------------------------------
# Which images are held out


def image_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed from (seed, the image's file name): the same on any machine and folder."""
    digest = hashlib.sha256(f"sdtrain-validation:{seed}:{PurePath(key).name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def held_out_keys(entries: list[Any], share: float, seed: int, where: str) -> set[str]:
    """Keys of the training images (not regularization images) that ``share`` holds out: the
    ``round(share × count)`` (at least 1) first in the order of :func:`image_seed`."""
    candidates = [e for e in entries if not e.is_reg]
    if share <= 0 or not candidates:
        return set()
    count = max(1, int(share * len(candidates) + 0.5))
    if count >= len(candidates):
        raise UserError(f"{where}: validation_split {share:g} would hold out all {len(candidates)} training "
                        "image(s); at least one must remain for training (lower it or add images)")
    ranked = sorted(candidates, key=lambda e: (image_seed(seed, e.key), e.key))
    return {e.key for e in ranked[:count]}


def validation_blueprint(blueprint: Any) -> Any:
    """The dataset settings for held-out images: no augmentation, no caption randomness."""
    subsets = tuple(dataclasses.replace(
        s, shuffle_caption=False, color_aug=False, flip_aug=False, face_crop_aug_range=None, random_crop=False,
        caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0,
        token_warmup_step=0.0) for s in blueprint.subsets)
    return dataclasses.replace(blueprint, subsets=subsets, is_validation=True)


def split_validation(group: Any, validation_options: ValidationOptions, seed: int) -> Any:
    """Split the validation images off ``group``: returns the training group, whose ``validation``
    attribute holds a :class:`~library.data.dataset.DatasetGroup` of the held-out images (each once, no
    repeats) or None. Refuses ``--validate_every_n_steps`` / ``--validate_every_n_epochs`` (``validation_options``)
    without a validation set."""
    from library.data.dataset import BucketedDataset, DatasetGroup

    train, held = [], []
    for index, ds in enumerate(group.datasets):
        bp = ds.blueprint
        if bp.is_validation:
            held.append(BucketedDataset(validation_blueprint(bp), [dataclasses.replace(e, num_repeats=1)
                                                                   for e in ds.entries]))
            continue
        vseed = bp.validation_seed if bp.validation_seed is not None else seed
        keys = held_out_keys(ds.entries, bp.validation_split, vseed, f"dataset {index}")
        if not keys:
            train.append(ds)
            continue
        train.append(BucketedDataset(bp, [e for e in ds.entries if e.key not in keys]))
        held.append(BucketedDataset(validation_blueprint(bp), [dataclasses.replace(e, num_repeats=1)
                                                               for e in ds.entries if e.key in keys]))
        logger.info("dataset %d: %d image(s) held out for the validation loss (validation_split %g, seed %d)",
                    index, len(keys), bp.validation_split, vseed)
    if held and not train:
        raise UserError("every dataset is marked is_validation = true; at least one dataset must train")
    if not held:
        if validation_options.validate_every_n_steps or validation_options.validate_every_n_epochs:
            raise UserError("--validate_every_n_steps / --validate_every_n_epochs need a validation set: give "
                            "--validation_split (e.g. 0.1) or mark a dataset 'is_validation = true' in the "
                            "dataset config")
        return group
    options = dict(seed=group.seed, tokenizer=group.tokenizer, max_token_length=group.max_token_length,
                   weighted_captions=group.weighted_captions)
    training = DatasetGroup(train, **options)
    training.precomputed_ok = group.precomputed_ok
    validation = DatasetGroup(held, **options)
    validation.precomputed_ok = group.precomputed_ok
    training.validation = validation
    logger.info("validation set: %d image(s) in %d dataset(s)", validation.num_images, len(held))
    return training


# --------------------------------------------------------------------------------------------------
# The loss


@dataclass(frozen=True)
class ValidationSettings:
    """When the validation loss is computed, and at which timesteps."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = 1
    timesteps: tuple[int, ...] = VALIDATION_TIMESTEPS
    max_batches: int | None = None  # --max_validation_steps: the first N batches of the fixed order only


class Validator:
    """Computes the validation loss at the points :meth:`due` names and logs it."""

    def __init__(self, group: Any, settings: ValidationSettings, run_seed: int):
        """``group`` holds the held-out images; ``run_seed`` is the default validation seed."""
        self.group, self.settings, self.run_seed = group, settings, run_seed
        # One fixed order for the whole run, one image per forward pass: batched matmuls round differently
        # from single ones, and the curve must not depend on --train_batch_size.
        batches = group.epoch_batches(1)
        if settings.max_batches is not None and settings.max_batches < len(batches):
            logger.info("validation loss over the first %d of %d validation batch(es) (--max_validation_steps)",
                        settings.max_batches, len(batches))
            batches = batches[:settings.max_batches]
        self.specs = [dataclasses.replace(spec, items=(item,)) for spec in batches for item in spec.items]
        self.last_step: int | None = None
        self.last_loss: float | None = None
        #: set where the trained weights are sharded (ZeRO-3, FSDP2): runs a function on every process inside
        #: the sharded root's forward; every process then makes the same number of forward passes
        self.together: Any = None

    def due(self, *, step: int, epoch: int | None = None, first: bool = False, last: bool = False) -> bool:
        """Before the first step, every N steps, every N epochs (at its end) and once at the end of the
        run; never twice at the same step."""
        s = self.settings
        if step == self.last_step:
            return False
        if first:
            return step == 0
        if last:
            return True
        if epoch is not None:
            return bool(s.every_n_epochs) and epoch % s.every_n_epochs == 0
        return bool(s.every_n_steps) and step % s.every_n_steps == 0

    def maybe_validate(self, trainer: Any, tracker: Any, *, step: int, epoch: int | None = None,
                       first: bool = False, last: bool = False) -> float | None:
        """Compute, log (``loss/validation`` at ``step``) and show the loss when due; every process calls it."""
        if not self.due(step=step, epoch=epoch, first=first, last=last):
            return None
        loss = self.compute(trainer)
        self.last_step, self.last_loss = step, loss
        tracker.log({LOG_KEY: loss}, step=step)
        pin = getattr(tracker, "pin", None)
        if pin is not None:
            pin("val", loss)
        logger.info("validation loss at step %d: %.6f", step, loss)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The last computed point (for the training state)."""
        return {"step": self.last_step, "loss": self.last_loss}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` output (a state without it is fine)."""
        if state:
            self.last_step, self.last_loss = state.get("step"), state.get("loss")

    def _seed_of(self, dataset_index: int) -> int:
        seed = self.group.datasets[dataset_index].blueprint.validation_seed
        return self.run_seed if seed is None else seed

    def compute(self, trainer: Any) -> float:
        """The mean validation loss over every held-out image and fixed timestep (all processes)."""
        import torch

        acc = trainer.accelerator
        rank, world = acc.process_index, acc.num_processes
        shares: list[tuple[float, int]] = []
        trainer.method.set_train(False)
        try:
            with torch.no_grad():
                if self.together is None:
                    shares.append(self._own_share(trainer, rank, world, in_step=False))
                else:
                    self.together(lambda: shares.append(self._own_share(trainer, rank, world, in_step=True)))
        finally:
            trainer.method.set_train(True)
        total, count = shares[0]
        if world > 1:
            sums = torch.tensor([total, float(count)], dtype=torch.float64, device=trainer.device)
            torch.distributed.all_reduce(sums)
            total, count = float(sums[0]), int(sums[1])
        return total / count if count else float("nan")

    def _own_share(self, trainer: Any, rank: int, world: int, *, in_step: bool) -> tuple[float, int]:
        """(loss sum, terms) of this process's images: every ``world``-th; unreadable ones add nothing.
        ``in_step`` (sharded weights, gathered collectively): every process makes one forward pass per round
        of ``world`` images; where it has no readable image of its own, it runs a stand-in that adds nothing
        (the round's first image in the last round, else the image it read before)."""
        total, count = 0.0, 0
        last: tuple[dict[str, Any], int] | None = None  # (batch, seed) of the last image read
        for start in range(0, len(self.specs), world):
            own = start + rank < len(self.specs)
            if not (own or in_step):
                continue
            index = start + rank if own else start
            spec = self.specs[index]
            batch = self.group.load_batch(spec, 1, index)
            if batch is not None:
                last = (batch, self._seed_of(spec.dataset))
            counts = own and batch is not None
            if not (counts or in_step):
                continue
            if last is None:
                raise UserError(f"validation with sharded weights: no held-out image of this process could be "
                                f"read (first: {spec.items[0]}); fix or remove the unreadable images")
            loss, terms = self._batch_loss(trainer, *last)
            if counts:
                total, count = total + loss, count + terms
        return total, count

    def _latents(self, trainer: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Cached latents, or the VAE posterior mean (no sampling: nothing random)."""
        from library.training.diffusion import LATENT_SCALE

        if batch.get("latents") is not None:
            latents = batch["latents"].to(trainer.device)
        else:
            vae = trainer.model.vae
            latents = vae.encode(batch["images"].to(trainer.device, dtype=vae.dtype)).latent_dist.mean
        return latents.to(trainer.step_settings.weight_dtype) * LATENT_SCALE

    def _batch_loss(self, trainer: Any, batch: dict[str, Any], seed: int) -> tuple[float, int]:
        """(sum of per-image, per-timestep MSE, number of terms) for one batch."""
        import torch

        latents = self._latents(trainer, batch)
        cond = trainer.conditioning(batch).detach()  # the method's, or the text-encoder output cache
        generators = [torch.Generator(device="cpu").manual_seed(image_seed(seed, key)) for key in batch["keys"]]
        total = 0.0
        for t in self.settings.timesteps:
            noise = torch.stack([torch.randn(tuple(latents.shape[1:]), generator=g, dtype=torch.float32)
                                 for g in generators]).to(trainer.device, latents.dtype)
            timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=trainer.device)
            pred, target = trainer.prediction_and_target(latents, noise, timesteps, cond)
            per_image = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
            total += float(per_image.double().sum())
        return total, latents.shape[0] * len(self.settings.timesteps)


def make_validator(validation: ValidationOptions, loss: LossOptions, group: Any, seed: int) -> Validator | None:
    """The run's :class:`Validator` (None without held-out images in ``group.validation``): reads
    --validate_every_n_steps / --validate_every_n_epochs (neither: every epoch), --max_validation_steps and the
    timestep range --min_timestep / --max_timestep."""
    held = group.validation
    if held is None:
        return None
    steps = validation.validate_every_n_steps
    epochs = validation.validate_every_n_epochs if steps or validation.validate_every_n_epochs else 1
    from library.training.timestep_loss_options import validation_timesteps

    # inside a --min_timestep / --max_timestep range: kohya's 4 evenly spaced timesteps of that range
    timesteps = validation_timesteps(loss.min_timestep, loss.max_timestep)
    settings = ValidationSettings(every_n_steps=steps, every_n_epochs=epochs,
                                  timesteps=timesteps or VALIDATION_TIMESTEPS,
                                  max_batches=validation.max_validation_steps)
    return Validator(held, settings, seed)
