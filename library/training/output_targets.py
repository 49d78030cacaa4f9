"""Where a run writes, checked before the model loads: the output folder, every save name, the inputs.

Each method module gives its :class:`library.output_safety.OutputLayout` (the file or folder name of a
save and its kind); the entry script hands it to the trainer, the dry run and :func:`check_outputs`.
:func:`check_outputs` stops a run with one line (exit 2) when ``--output_dir`` cannot be created or
written, or when any name the run will write holds something other than an older save of the same
kind, or an input of the run (the base model, the VAE, weights, dataset folders, …). It also removes
the temporaries a killed run left for these names (:mod:`library.fileio`).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.fileio import describe_os_error, remove_leftovers
from library.option_groups import Options
from library.output_safety import OutputLayout, check_target

#: options whose values are files or folders the run reads (never replaced by a save)
INPUT_OPTIONS = ("pretrained_model_name_or_path", "vae", "network_weights", "weights", "dataset_config", "in_json",
                 "train_data_dir", "reg_data_dir", "sample_prompts", "conditioning_data_dir", "reference_model",
                 "tokenizer_cache_dir", "resume", "base_weights")


def run_inputs(opts: Options, blueprint: Any = None) -> list[tuple[str, str]]:
    """``(option, path)`` of everything the run reads: the path options of :data:`INPUT_OPTIONS` (looked up by
    name, :meth:`Options.option`) and the folders and files of the dataset ``blueprint``
    (a :class:`library.config.blueprint.DatasetBlueprint`, or None)."""
    found: list[tuple[str, str]] = []
    for name in INPUT_OPTIONS:
        value = opts.option(name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, os.PathLike)) and str(item):
                found.append((f"--{name}", os.fspath(item)))
    for dataset in blueprint.datasets if blueprint is not None else ():
        for subset in dataset.subsets:
            for key in ("image_dir", "metadata_file", "conditioning_data_dir"):
                value = getattr(subset, key)
                if value:
                    found.append((f"the dataset's {key}", value))
    return found


def _first_file_on_path(folder: Path) -> Path | None:
    """The first existing non-folder among ``folder`` and its parents (a path through a file)."""
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_output_dir(output_dir: str | os.PathLike | None) -> Path:
    """``--output_dir`` given, creatable and writable (created here); UserError with the reason otherwise."""
    if not output_dir:
        raise UserError("--output_dir is required (where trained files are written)")
    folder = Path(os.path.expanduser(os.fspath(output_dir)))
    blocker = _first_file_on_path(folder)
    if blocker is not None:
        where = "is a file" if blocker == folder else f"lies below the file {blocker}"
        raise UserError(f"--output_dir {output_dir}: {where}; give a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        hint = " (the folder is read-only for this user)" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) \
            else ""
        raise UserError(f"--output_dir {output_dir}: cannot write there: {describe_os_error(exc)}{hint}") from None
    return folder


def check_outputs(opts: Options, layout: OutputLayout, blueprint: Any, plan: Any, *, output_name: str | None,
                  sampling: bool = False, main_process: bool = True) -> None:
    """The pre-flight check of every save this run will make, named by the method's ``layout`` with the stem
    ``output_name`` (``--output_name``, or the method's default)."""
    from library.training.save_plan import plan_outputs

    folder = check_output_dir(opts.save.output_dir)
    outputs = plan_outputs(opts, plan, layout.file_name, output_name=output_name, sample_prompts=0)
    inputs = run_inputs(opts, blueprint)
    resume = opts.save.resume
    names = [save.name.rstrip("/") for save in outputs.saves]
    if main_process:
        remove_leftovers(folder, names)
    for save in outputs.saves:
        path = folder / save.name.rstrip("/")
        is_state = save.kind.endswith("state")
        may_be_input = is_state and bool(resume) and _same(path, resume)
        check_target(path, "state" if is_state else layout.kind, inputs,
                     what="--save_state" if is_state else "--output_name", may_be_input=may_be_input)
    sample_dir = folder / "sample"
    if sampling and sample_dir.exists() and not sample_dir.is_dir():
        raise UserError(f"sample images go to {sample_dir}, which is a file; move it away")


def _same(a: Path, b: str | os.PathLike) -> bool:
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:
        return False
