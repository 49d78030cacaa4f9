"""What the run tells its trackers at start: ``--wandb_run_name``, ``--log_config``, ``--log_tracker_config``.

accelerate's ``init_trackers(project, config=..., init_kwargs=...)`` receives

* ``init_kwargs``: the tables of the ``--log_tracker_config`` TOML file (``[wandb]`` → ``wandb.init(**…)``,
  ``[tensorboard]`` → ``SummaryWriter(**…)``), with ``wandb.name = --wandb_run_name`` unless the file sets one;
* ``config`` (only with ``--log_config``): the training options, without secrets (``--wandb_api_key``,
  ``--huggingface_token``) and without local paths (model, VAE, data, output and log folders), values
  converted to bool / int / float / str / None. TensorBoard stores it as hparams in its event file (and
  accelerate writes a ``hparams.yml`` beside it), W&B as the run config.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, field
from typing import Any

from library.errors import UserError
from library.option_groups import LoggingOptions

#: options never sent to a tracker: secrets, then local paths (kohya's lists, plus our other secrets)
SECRET_OPTIONS = ("wandb_api_key", "huggingface_token")
PATH_OPTIONS = ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir",
                "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir")
TRACKER_TABLES = ("tensorboard", "wandb")


def add_tracker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--wandb_run_name``, ``--log_tracker_config``, ``--log_config`` (kohya's names and defaults)."""
    g = parser.add_argument_group("tracker set-up")
    g.add_argument("--wandb_run_name", type=str, default=None, help="name of this run in W&B")
    g.add_argument("--log_tracker_config", type=str, default=None, metavar="FILE",
                   help="TOML file of tracker start-up arguments: a [wandb] table for wandb.init(), a "
                        "[tensorboard] table for SummaryWriter()")
    g.add_argument("--log_config", action="store_true",
                   help="record the training options (without API keys and local paths) in the tracker: "
                        "TensorBoard hparams, W&B config")


@dataclass(frozen=True)
class TrackerStart:
    """The arguments of ``accelerator.init_trackers`` besides the project name."""

    init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] | None = None


def read_tracker_config(path: str) -> dict[str, dict[str, Any]]:
    """The tables of a ``--log_tracker_config`` file; any mistake is one UserError naming the file."""
    import tomllib

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"--log_tracker_config {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--log_tracker_config {path}: is a folder; give a TOML file") from None
    except OSError as exc:
        raise UserError(f"--log_tracker_config {path}: cannot read it ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--log_tracker_config {path}: not valid TOML ({exc})") from None
    for key, value in data.items():
        if key not in TRACKER_TABLES:
            raise UserError(f"--log_tracker_config {path}: unknown table [{key}]; allowed: "
                            f"{', '.join(f'[{t}]' for t in TRACKER_TABLES)}")
        if not isinstance(value, dict):
            raise UserError(f"--log_tracker_config {path}: '{key}' must be a table ([{key}] with key = value "
                            "lines), got a single value")
    unknown = sorted(set(data.get("tensorboard", {})) - _summary_writer_arguments())
    if unknown:
        raise UserError(f"--log_tracker_config {path}: [tensorboard] {', '.join(unknown)} is not an argument of "
                        f"SummaryWriter (allowed: {', '.join(sorted(_summary_writer_arguments()))})")
    return data


def _summary_writer_arguments() -> set[str]:
    from torch.utils.tensorboard import SummaryWriter

    names = set(inspect.signature(SummaryWriter.__init__).parameters) - {"self"}
    return names - {"log_dir", "logdir"}  # accelerate gives the folder


def tracker_problems(args: argparse.Namespace) -> list[str]:
    """``--log_tracker_config`` must be readable TOML of tracker tables (checked before anything loads)."""
    path = args.log_tracker_config
    if not path:
        return []
    try:
        read_tracker_config(path)
    except UserError as exc:
        return [str(exc)]
    return []


def tracker_init_kwargs(wandb_run_name: str | None, tracker_config: str | None) -> dict[str, dict[str, Any]]:
    """``init_kwargs`` for accelerate: the file's tables, and ``wandb.name`` from ``--wandb_run_name``
    where the file does not set it."""
    kwargs = {key: dict(value) for key, value in (read_tracker_config(tracker_config) if tracker_config
                                                  else {}).items()}
    if wandb_run_name:
        kwargs.setdefault("wandb", {}).setdefault("name", wandb_run_name)
    return kwargs


def sanitized_config(options: dict[str, Any]) -> dict[str, Any]:
    """The options a tracker may record: no secrets, no local paths, plain values (others as text)."""
    config = {}
    for key, value in options.items():
        if key in SECRET_OPTIONS or key in PATH_OPTIONS:
            continue
        config[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return config


def tracker_start(logging_options: LoggingOptions, command_line: dict[str, Any]) -> TrackerStart:
    """The :class:`TrackerStart` of the run: reads --wandb_run_name, --log_tracker_config and --log_config, which
    records ``command_line`` (every option of the script by name, :meth:`library.option_groups.Options.command_line`)
    sanitized."""
    kwargs = tracker_init_kwargs(logging_options.wandb_run_name, logging_options.log_tracker_config)
    config = sanitized_config(command_line) if logging_options.log_config else None
    return TrackerStart(init_kwargs=kwargs, config=config)
