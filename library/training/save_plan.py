"""The files a run would write, for ``--dry_run``: the save points of ``--save_every_n_epochs`` /
``--save_every_n_steps`` with the retention rules of ``--save_last_n_*``, the final save, training states,
sample images and the log folder — named exactly as the training loop names them
(:mod:`library.training.checkpoint`), with the existing files that a run would replace or delete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from library.option_groups import HubOptions, Options, SampleOptions, SaveOptions
from library.training.checkpoint import epoch_name, epoch_to_remove, final_name, step_name, step_to_remove
from library.training.plan import RunPlan, save_every_n_epochs


@dataclass
class PlannedSave:
    """One save of the run."""

    name: str          # file or folder name inside --output_dir (folders end with "/")
    kind: str          # "epoch", "step", "final", "epoch state", "step state", "final state"
    point: str         # "epoch 2", "step 300", "end"
    kept: bool = True  # False when --save_last_n_* deletes it later in the run
    exists: bool = False


@dataclass
class OutputPlan:
    """Everything written under ``--output_dir`` and ``--logging_dir``."""

    output_dir: str
    saves: list[PlannedSave] = field(default_factory=list)
    deleted_existing: list[str] = field(default_factory=list)  # files of earlier runs a retention rule removes
    sample_dir: str | None = None
    sample_points: list[str] = field(default_factory=list)
    sample_prompts: int = 0
    sample_pattern: str | None = None
    log_dir: str | None = None

    @property
    def sample_files(self) -> int:
        """PNG files written over the run."""
        return len(self.sample_points) * self.sample_prompts

    def to_json(self) -> dict:
        """The plan as JSON-ready data."""
        return {"output_dir": self.output_dir,
                "saves": [{"name": s.name, "kind": s.kind, "point": s.point, "kept": s.kept, "exists": s.exists}
                          for s in self.saves],
                "deleted_existing": self.deleted_existing,
                "samples": {"dir": self.sample_dir, "points": self.sample_points, "prompts": self.sample_prompts,
                            "files": self.sample_files, "pattern": self.sample_pattern},
                "log_dir": self.log_dir}


def resume_point(save: SaveOptions, hub: HubOptions) -> tuple[int, int]:
    """``(global_step, epoch)`` a ``--resume`` state continues from (``(0, 1)`` for a fresh run); read from
    the state's ``state.json`` only."""
    from library.training.hub_resume import resume_folder

    resume = resume_folder(save, hub)  # the downloaded folder with --resume_from_huggingface
    if resume:
        info = Path(resume) / "state.json"
        if info.is_file():
            try:
                data = json.loads(info.read_text(encoding="utf-8"))
                return int(data.get("global_step", 0)), int(data.get("epoch", 1))
            except (ValueError, OSError):
                pass
    return 0, 1


def _exists(output_dir: Path, name: str) -> bool:
    return (output_dir / name.rstrip("/")).exists()


def plan_outputs(opts: Options, plan: RunPlan, file_name, *, output_name: str | None,
                 sample_prompts: int) -> OutputPlan:
    """Every file of the run. ``file_name(stem)`` is the method's name for a save of ``stem`` (e.g.
    ``stem + ".safetensors"``, or ``stem + "/"`` for a diffusers folder); ``output_name`` is the stem of the
    run's saves (``--output_name``, or the method's default: Textual Inversion's token). Reads the save group,
    the start step (--resume, --resume_from_huggingface, --initial_step / --initial_epoch), the sample group and
    --logging_dir / --log_prefix."""
    save = opts.save
    out_dir = Path(save.output_dir)
    result = OutputPlan(output_dir=str(out_dir))
    stem = output_name
    start_step, start_epoch = resume_point(save, opts.hub)
    from library.training.start_step import initial_step_from

    initial = initial_step_from(opts.training, plan.steps_per_epoch)  # --initial_step / --initial_epoch
    if initial is not None:
        start_step, start_epoch = initial, initial // plan.steps_per_epoch + 1
    every_epochs = save_every_n_epochs(plan.num_epochs, save.save_every_n_epochs, save.save_n_epoch_ratio)
    every_steps = save.save_every_n_steps
    states = bool(save.save_state)
    removed: set[str] = set()

    def add(kind: str, point: str, save_stem: str, remove: str | None, remove_state: str | None) -> None:
        result.saves.append(PlannedSave(file_name(save_stem), kind, point))
        if states:
            result.saves.append(PlannedSave(f"{save_stem}-state/", f"{kind} state", point))
        for old, suffix in ((remove, None), (remove_state, "-state")):
            if old is None:
                continue
            target = file_name(old) if suffix is None else f"{old}-state/"
            removed.add(target)
            written = any(s.name == target for s in result.saves)
            if not written and _exists(out_dir, target):  # an earlier run's save of exactly that name
                result.deleted_existing.append(target)

    if every_steps:
        for step in range((start_step // every_steps + 1) * every_steps, plan.max_train_steps, every_steps):
            old = step_to_remove(step, every_steps, save.save_last_n_steps)
            old_state = step_to_remove(step, every_steps, save.save_last_n_steps_state or save.save_last_n_steps)
            add("step", f"step {step}", step_name(stem, step), step_name(stem, old) if old else None,
                step_name(stem, old_state) if old_state and states else None)
    if every_epochs:
        for epoch in range(start_epoch, plan.num_epochs):
            if epoch % every_epochs:
                continue
            old = epoch_to_remove(epoch, every_epochs, save.save_last_n_epochs)
            old_state = epoch_to_remove(epoch, every_epochs, save.save_last_n_epochs_state or save.save_last_n_epochs)
            add("epoch", f"epoch {epoch}", epoch_name(stem, epoch), epoch_name(stem, old) if old else None,
                epoch_name(stem, old_state) if old_state and states else None)
    add("final", "end", final_name(stem), None, None)
    if save.save_state_on_train_end and not states:
        result.saves.append(PlannedSave(f"{final_name(stem)}-state/", "final state", "end"))
    for planned in result.saves:
        planned.kept = planned.name not in removed
        planned.exists = _exists(out_dir, planned.name)
    result.deleted_existing = sorted(set(result.deleted_existing))
    _plan_samples(opts.sample, plan, result, start_step, start_epoch, sample_prompts, output_name)
    logging_options = opts.logging
    if logging_options.logging_dir:
        stamp = f"{logging_options.log_prefix or ''}<YYYYmmddHHMMSS>"
        result.log_dir = str(Path(logging_options.logging_dir) / stamp) + "/"
    return result


def _plan_samples(sample: SampleOptions, plan: RunPlan, result: OutputPlan, start_step: int, start_epoch: int,
                  prompts: int, output_name: str | None) -> None:
    """Sampling points as :class:`library.training.sampling.SampleSettings` decides them (into
    ``result.output_dir``/sample)."""
    steps, epochs = sample.sample_every_n_steps, sample.sample_every_n_epochs
    at_first = sample.sample_at_first
    if not (steps or epochs or at_first) or not sample.sample_prompts:
        return
    points = [f"start (step {start_step})"] if at_first else []
    if epochs:
        points += [f"epoch {e}" for e in range(start_epoch, plan.num_epochs + 1) if e % epochs == 0]
    elif steps:
        points += [f"step {s}" for s in range((start_step // steps + 1) * steps, plan.max_train_steps + 1, steps)]
    result.sample_dir = str(Path(result.output_dir) / "sample") + "/"
    result.sample_points = points
    result.sample_prompts = prompts
    prefix = f"{output_name}_" if output_name else ""
    result.sample_pattern = f"{prefix}<YYYYmmddHHMMSS>_<step or e+epoch>_<prompt line>[_<seed>].png"
