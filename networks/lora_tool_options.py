"""The options every LoRA tool shares and their checks: precision and device, the merge tools' inputs and
ratios, and the output (``--save_to``, never an input unless ``--overwrite_input``). Reading and writing the
files is :mod:`networks.lora_files`; tool conventions: tools_and_preprocessing.md §1.2-§1.4.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

PRECISION_NAMES = ("float", "fp16", "bf16")
_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_precision_arguments(parser: argparse.ArgumentParser, save_default: str,
                            precision_help: str | None = None) -> None:
    """``--save_precision`` (its default described by ``save_default``) and, when ``precision_help`` is
    given, ``--precision`` (default float)."""
    parser.add_argument("--save_precision", default=None, choices=[None, *PRECISION_NAMES],
                        help=f"dtype of the saved file (default: {save_default})")
    if precision_help is not None:
        parser.add_argument("--precision", default="float", choices=PRECISION_NAMES, help=precision_help)


def add_device_argument(parser: argparse.ArgumentParser, used_for: str) -> None:
    """``--device`` (default CPU), checked by :func:`torch_device`."""
    parser.add_argument("--device", default=None, help=f"device for {used_for}, e.g. cuda (default CPU)")


def add_merge_arguments(parser: argparse.ArgumentParser, save_to_help: str, models_help: str) -> None:
    """``--save_to``, ``--models``, ``--ratios`` (one per model), ``--no_metadata`` and ``--overwrite_input``
    of the merge tools."""
    parser.add_argument("--save_to", default=None, help=save_to_help)
    parser.add_argument("--models", nargs="*", default=None, help=models_help)
    parser.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio (strength) per LoRA file")
    parser.add_argument("--no_metadata", action="store_true",
                        help="accepted for compatibility: only the minimal ss_* metadata is written anyway")
    add_overwrite_input_argument(parser)


def require_options(args: argparse.Namespace, **needed: str) -> None:
    """UserError ``--<name> is required (<what>)`` for the first option of ``needed`` that was not given."""
    for name, what in needed.items():
        if not getattr(args, name):
            raise UserError(f"--{name} is required ({what})")


def check_ranks(**ranks: int | None) -> None:
    """UserError for a rank option (``new_rank=…``; None = not given) below 1."""
    for name, value in ranks.items():
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: the rank must be at least 1")


def output_dtypes(args: argparse.Namespace) -> tuple[torch.dtype | None, torch.dtype]:
    """``(--precision dtype, --save_precision dtype)``; the first is None for a tool without
    ``--precision``, the second defaults to the first, else float32."""
    merge_dtype = precision_dtype(getattr(args, "precision", None))
    return merge_dtype, precision_dtype(args.save_precision, "--save_precision") or merge_dtype or torch.float32


def precision_dtype(name: str | None, option: str = "--precision") -> torch.dtype | None:
    """``float``/``fp16``/``bf16`` → torch dtype; None stays None."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise UserError(f"{option} {name}: expected one of {', '.join(PRECISION_NAMES)}")
    return _DTYPES[name]


def torch_device(name: str | None) -> torch.device:
    """``--device``: a torch device that exists on this machine (None → CPU)."""
    if not name:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a torch device name (use cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; leave --device out to use the CPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: MPS is not available on this machine")
    return device


def add_overwrite_input_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite_input``: let ``--save_to`` replace an input file (checked by :func:`refuse_overwriting_inputs`)."""
    parser.add_argument("--overwrite_input", action="store_true",
                        help="allow --save_to to be one of the input files: the result is written to a temporary "
                             "name and renamed over it, so a failed run leaves the input as it was (folders: never)")


def refuse_overwriting_inputs(save_to: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]],
                              allowed: bool = False, kind: str = "network") -> None:
    """UserError when ``save_to`` is one of the input files/folders (the input would be lost), unless
    ``allowed`` (``--overwrite_input``) and it is a file: the atomic write then replaces it in one rename.
    Any other existing ``save_to`` must be a file of ``kind`` (:func:`library.output_safety.check_target`):
    nothing else is ever replaced."""
    from library.output_safety import check_target

    target = Path(save_to)
    if not target.exists():
        return
    for option, source in inputs:
        if source is None or not Path(source).exists():
            continue
        try:
            same = os.path.samefile(target, source)
        except OSError:
            same = False
        if not same:
            continue
        if target.is_dir():
            raise UserError(f"--save_to {save_to} is the same folder as {option} {source}; choose another output "
                            "name (a model folder is never replaced in place)")
        if not allowed:
            raise UserError(f"--save_to {save_to} is the same file as {option} {source}; choose another output "
                            "name, or pass --overwrite_input to replace it")
        logger.warning("--overwrite_input: %s (%s) will be replaced by the result", save_to, option)
        return
    check_target(target, kind, what="--save_to")


def check_save_to(save_to: str | None, wants_folder: bool = False) -> Path:
    """``--save_to`` given, and not an existing folder when a file is written."""
    if not save_to:
        raise UserError("--save_to is required: the output file (.safetensors, or .pt/.ckpt)")
    path = Path(save_to)
    if path.is_dir() and not wants_folder:
        raise UserError(f"--save_to {save_to}: is a folder; give a file name such as {path / 'merged.safetensors'}")
    return path


def check_merge_args(args: argparse.Namespace, wants_folder: bool = False,
                     other_inputs: Sequence[tuple[str, str | None]] = (), kind: str = "network") -> Path:
    """The checks of the merge tools: ``--models``/``--ratios`` (:func:`check_models_and_ratios`),
    ``--save_to`` (:func:`check_save_to`) and not an input (``--models`` or ``other_inputs``) unless
    ``--overwrite_input``; returns it."""
    check_models_and_ratios(args.models, args.ratios)
    save_to = check_save_to(args.save_to, wants_folder)
    refuse_overwriting_inputs(save_to, [*other_inputs, *(("--models", m) for m in args.models)],
                              allowed=args.overwrite_input, kind=kind)
    return save_to


def check_models_and_ratios(models: Sequence[str] | None, ratios: Sequence[float] | None) -> None:
    """``--models`` non-empty and exactly one ``--ratios`` value per model."""
    if not models:
        raise UserError("--models: give at least one LoRA file")
    count = 0 if ratios is None else len(ratios)
    if count != len(models):
        raise UserError(f"--ratios: {len(models)} value(s) needed, one per --models file, but {count} given")
