"""The start every training entry script shares: the option checks, the option groups, ``--debug_dataset``,
the sample settings, ``--save_precision``, the method's start, ``--dry_run`` and the set-up of the run.

It sits above library/training and library/dry_run (it hands the run either to the dry run or to
:func:`library.training.session.prepare_run`), so it is its own module (docs/architecture.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from library.option_groups import Options


@dataclass(frozen=True)
class ScriptSupport:
    """What an entry script accepts: DreamBooth folders (``dreambooth``), the caption options and fine-tuning
    (``--in_json`` metadata) datasets (``captions``), and the name of its tracker project."""

    tracker_name: str
    dreambooth: bool
    captions: bool


def start_run(args: argparse.Namespace, script: ScriptSupport, method_start: Callable[[Options], Any], *,
              debug_extras: Callable[[Options], dict[str, Any]] | None = None) -> Any:
    """The shared start, in order: the option checks (:func:`library.training.args.validate_training_args`),
    the option groups (:meth:`Options.from_args`), ``--debug_dataset`` (with ``debug_extras(opts)``, e.g. Textual
    Inversion's new tokens and caption replacements), the sample settings, ``--save_precision``, the method's
    start (``method_start(opts)``: a :class:`library.methods.base.MethodStart` with the method's own checks, its
    save layout and the stem of its saves), ``--dry_run`` and :func:`library.training.session.prepare_run`.

    Returns the exit code where the run ends here (``--debug_dataset``, ``--dry_run``), else the
    :class:`library.training.session.StartedRun`."""
    from library.distributed import record_start_up_into
    from library.models.save import precision_dtype
    from library.training import session
    from library.training.args import validate_training_args
    from library.training.sampling import sample_settings

    validate_training_args(args)
    opts = Options.from_args(args)
    record_start_up_into(opts.training.record_training_dir)  # set (or cleared) for every run of this process
    if opts.data.debug_dataset:
        from library.dataset_debug import debug_dataset

        return debug_dataset(opts, support_dreambooth=script.dreambooth, support_caption=script.captions,
                             **(debug_extras(opts) if debug_extras is not None else {}))
    sampling = sample_settings(opts.sample)
    save_dtype = precision_dtype(opts.save.save_precision)
    start = method_start(opts)
    if opts.dry_run.requested:  # report and exit before anything is loaded (docs/dry_run.md)
        from library.dry_run.report import run_dry_run

        return run_dry_run(opts, start.dry_run_plan(), output_name=start.output_name,
                           text_encoder_use=start.text_encoder_use,
                           support_dreambooth=script.dreambooth, support_finetuning=script.captions,
                           configure_group=start.configure_group)
    run = session.prepare_run(opts, script.tracker_name, layout=start.layout, output_name=start.output_name,
                              text_encoder_use=start.text_encoder_use,
                              support_dreambooth=script.dreambooth, support_finetuning=script.captions,
                              configure_group=start.configure_group)
    return session.StartedRun(opts, sampling, save_dtype, run)
