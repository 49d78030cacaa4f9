"""Optimizer table: ``--optimizer_type`` name (or ``module.Class``) plus ``key=value`` arguments.

training_options.md §4, §4.1-§4.3. Built-in names are matched case-insensitively and looked up in
:data:`BUILTIN_OPTIMIZERS`; anything else is imported as a class (``RMSprop`` from ``torch.optim``,
``package.module.Class`` otherwise). Optional packages (bitsandbytes, lion-pytorch, dadaptation,
prodigyopt) are imported only when their optimizer is asked for.

Nothing here rewrites the caller's options: the AdaFactor relative-step rules (§4.2) come back as fields
of :class:`BuiltOptimizer` (``learning_rate``, ``group_lrs_cleared``, ``lr_scheduler``) for the caller
to apply and record.
"""

from __future__ import annotations

import ast
import importlib
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = "AdamW"

# Import name of an optional package → the name pip installs it under.
PIP_NAMES: dict[str, str] = {
    "bitsandbytes": "bitsandbytes",
    "lion_pytorch": "lion-pytorch",
    "dadaptation": "dadaptation",
    "prodigyopt": "prodigyopt",
    "transformers": "transformers",
}


# ---------------------------------------------------------------------------------------------------
# key=value arguments (§4.1)


def _literal(text: str) -> Any:
    """``ast.literal_eval(text)``, or ``text`` itself when it is not a Python literal."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_optimizer_args(strings: Sequence[str] | None, option: str = "--optimizer_args") -> dict[str, Any]:
    """Parse ``key=value`` items into keyword arguments (training_options.md §4.1).

    The key is taken verbatim; the value goes through ``ast.literal_eval``, so ``weight_decay=0.01`` is a
    float, ``betas=0.9,0.999`` the tuple ``(0.9, 0.999)`` (a comma makes a tuple, it never separates
    items), ``relative_step=True`` a bool, ``foo=[1,2]`` a list and ``name="x"`` a str. A value that is
    not a Python literal (``decouple=yes``) is kept as the plain string (the reference raised here).
    The item is split at its first ``=``. A later duplicate key wins. ``option`` names the option in
    error messages (``--lr_scheduler_args`` uses the same parser).
    """
    kwargs: dict[str, Any] = {}
    for item in strings or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{option}: '{item}' is not key=value (e.g. weight_decay=0.01 or betas=0.9,0.999)")
        kwargs[key] = _literal(value)
    return kwargs


def format_optimizer_args(kwargs: Mapping[str, Any]) -> str:
    """The metadata form of parsed arguments: ``k=v`` joined by commas with ``str()`` of each value.

    E.g. ``{"weight_decay": 0.01, "betas": (0.9, 0.999)}`` → ``weight_decay=0.01,betas=(0.9, 0.999)``.
    """
    return ",".join(f"{key}={value}" for key, value in kwargs.items())


# ---------------------------------------------------------------------------------------------------
# importing classes


def _install_hint(module_name: str) -> str:
    """``pip install X`` for the top-level package of ``module_name``."""
    top = module_name.split(".")[0]
    return f"pip install {PIP_NAMES.get(top, top)}"


def import_optional(module_name: str, what: str) -> types.ModuleType:
    """Import an optional package for ``what`` (e.g. ``--optimizer_type AdamW8bit``).

    A missing package raises the one-line UserError "<what> needs the package 'X' (pip install X)";
    a package that is installed but fails to import (e.g. no usable GPU library) says so.
    """
    top = module_name.split(".")[0]
    pip_name = PIP_NAMES.get(top, top)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == top:
            raise UserError(f"{what} needs the package '{pip_name}' ({_install_hint(module_name)})") from exc
        raise UserError(f"{what}: importing '{module_name}' failed: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - broken native libraries raise anything
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: the package '{pip_name}' is installed but cannot be imported here ({message})") from exc


def import_class(spec: str, *, default_module: str, option: str, unknown_hint: str) -> Callable[..., Any]:
    """Resolve ``spec`` to a class (training_options.md §4.3).

    Without a dot the class is an attribute of ``default_module`` (``RMSprop`` → ``torch.optim.RMSprop``);
    with dots everything before the last dot is imported and the last component is the class. A name
    that resolves to nothing callable raises UserError: ``unknown_hint`` (the allowed names) for a
    dotless name, the module and class for a dotted one.
    """
    module_name, dot, attr = spec.rpartition(".")
    if not dot:
        module_name = default_module
    if not attr or not module_name:
        raise UserError(f"{option} '{spec}' is not a class name: {unknown_hint}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(
            f"{option} {spec}: cannot import module '{module_name}' ({exc}); install the package that "
            "provides it or fix the name"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - broken third-party modules raise anything
        raise UserError(f"{option} {spec}: importing '{module_name}' failed ({type(exc).__name__}: {exc})") from exc
    cls = getattr(module, attr, None)
    if cls is None or isinstance(cls, types.ModuleType) or not callable(cls):
        if not dot:
            raise UserError(f"unknown {option} '{spec}': {unknown_hint}")
        raise UserError(f"{option} {spec}: module '{module_name}' has no class '{attr}'")
    return cls


# ---------------------------------------------------------------------------------------------------
# built-in optimizers (§4.2)


@dataclass
class _Plan:
    """What a built-in's ``prepare`` hook may inspect and adjust before the optimizer is constructed."""

    name: str
    params: list[Any]
    lr: float | None
    kwargs: dict[str, Any]
    max_grad_norm: float
    lr_scheduler: str
    learning_rate: float | None = None
    group_lrs_cleared: bool = False
    scheduler_override: str | None = None


@dataclass(frozen=True)
class OptimizerEntry:
    """One built-in optimizer: where its class lives and what is done before construction.

    ``fixed`` are keyword arguments always passed (not recorded in metadata, e.g. ``nesterov=True``);
    ``prepare`` adjusts the plan (defaults, warnings, AdaFactor rules); ``missing_hint`` replaces the
    generic message when the package imports but lacks the class (old version).
    """

    name: str
    module: str
    attr: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    prepare: Callable[[_Plan], None] | None = None
    missing_hint: str | None = None


def _default_momentum(plan: _Plan) -> None:
    """SGD with Nesterov needs momentum: insert ``momentum=0.9`` when not given."""
    if "momentum" not in plan.kwargs:
        logger.info("%s: Nesterov SGD needs momentum; using momentum=0.9", plan.name)
        plan.kwargs["momentum"] = 0.9


def _warn_adaptive_lr(plan: _Plan) -> None:
    """D-Adaptation / Prodigy: --learning_rate is a multiplier (≈1.0), and only the first group's counts."""
    actual_lr = plan.lr
    group_lrs: set[Any] = set()
    if plan.params and isinstance(plan.params[0], dict):
        actual_lr = plan.params[0].get("lr", actual_lr)
        group_lrs = {group.get("lr", actual_lr) for group in plan.params}
    if actual_lr is not None and actual_lr <= 0.1:
        logger.warning(
            "%s: the learning rate %s looks too low; for adaptive optimizers it is a multiplier, "
            "usually 1.0", plan.name, actual_lr,
        )
    if len(group_lrs) > 1:
        logger.warning(
            "%s: parameter groups have different learning rates %s; only the first group's (%s) is effective",
            plan.name, sorted(group_lrs, key=str), actual_lr,
        )


def _prepare_adafactor(plan: _Plan) -> None:
    """AdaFactor rules of §4.2: relative_step defaults to True and then owns lr and the schedule."""
    kwargs = plan.kwargs
    if "relative_step" not in kwargs:
        kwargs["relative_step"] = True
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("AdaFactor: warmup_init=True needs relative_step; setting relative_step=True")
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        if plan.lr is not None:
            logger.info("AdaFactor relative_step: --learning_rate %s is only the scheduler's initial value", plan.lr)
        stripped = []
        for group in plan.params:
            if isinstance(group, dict) and "lr" in group:
                group = {key: value for key, value in group.items() if key != "lr"}
                plan.group_lrs_cleared = True
            stripped.append(group)
        plan.params = stripped
        if plan.group_lrs_cleared:
            logger.info("AdaFactor relative_step: --unet_lr and --text_encoder_lr are ignored")
        if plan.lr_scheduler != "adafactor":
            logger.info("AdaFactor relative_step: using the adafactor lr scheduler")
        plan.scheduler_override = f"adafactor:{plan.lr}"
        plan.learning_rate = None
        plan.lr = None
        return
    if plan.max_grad_norm != 0.0:
        logger.warning("AdaFactor without relative_step: --max_grad_norm 0 is recommended")
    if plan.lr_scheduler != "constant_with_warmup":
        logger.warning("AdaFactor without relative_step: --lr_scheduler constant_with_warmup is recommended")
    if kwargs.get("clip_threshold", 1.0) != 1.0:
        logger.warning("AdaFactor without relative_step: clip_threshold=1.0 is recommended")


_BNB_LION_HINT = "needs bitsandbytes 0.38.0 or later (pip install -U bitsandbytes)"

_ENTRIES: tuple[OptimizerEntry, ...] = (
    OptimizerEntry("AdamW", "torch.optim", "AdamW"),
    OptimizerEntry("AdamW8bit", "bitsandbytes.optim", "AdamW8bit"),
    OptimizerEntry("Lion", "lion_pytorch", "Lion"),
    OptimizerEntry("Lion8bit", "bitsandbytes.optim", "Lion8bit", missing_hint=_BNB_LION_HINT),
    OptimizerEntry("SGDNesterov", "torch.optim", "SGD", {"nesterov": True}, _default_momentum),
    OptimizerEntry("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", {"nesterov": True}, _default_momentum),
    OptimizerEntry("DAdaptation", "dadaptation", "DAdaptAdam", prepare=_warn_adaptive_lr),
    OptimizerEntry("DAdaptAdam", "dadaptation", "DAdaptAdam", prepare=_warn_adaptive_lr),
    OptimizerEntry("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", prepare=_warn_adaptive_lr),
    OptimizerEntry("DAdaptAdan", "dadaptation", "DAdaptAdan", prepare=_warn_adaptive_lr),
    OptimizerEntry("DAdaptSGD", "dadaptation", "DAdaptSGD", prepare=_warn_adaptive_lr),
    # Beyond the 2023-05 baseline (upstream added them later; harmless extra names):
    OptimizerEntry("DAdaptLion", "dadaptation", "DAdaptLion", prepare=_warn_adaptive_lr),
    OptimizerEntry("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", prepare=_warn_adaptive_lr),
    OptimizerEntry("Prodigy", "prodigyopt", "Prodigy", prepare=_warn_adaptive_lr),
    OptimizerEntry("AdaFactor", "transformers.optimization", "Adafactor", prepare=_prepare_adafactor),
)

BUILTIN_OPTIMIZERS: dict[str, OptimizerEntry] = {entry.name.lower(): entry for entry in _ENTRIES}


def known_optimizer_names() -> list[str]:
    """The built-in ``--optimizer_type`` names in their documented spelling."""
    return [entry.name for entry in _ENTRIES]


def _unknown_hint() -> str:
    """The allowed values, for an unknown ``--optimizer_type``."""
    return (f"use one of {', '.join(known_optimizer_names())} (any case), a torch.optim class such as "
            "RMSprop, or module.Class")


def resolve_optimizer_name(optimizer_type: str | None, *, use_8bit_adam: bool = False,
                           use_lion_optimizer: bool = False) -> str:
    """Apply the legacy flags: ``--use_8bit_adam`` → AdamW8bit, ``--use_lion_optimizer`` → Lion.

    Either flag together with a non-empty ``--optimizer_type`` (or both flags) is a UserError.
    An empty or missing ``--optimizer_type`` means AdamW.
    """
    given = optimizer_type or ""
    if use_8bit_adam:
        if use_lion_optimizer:
            raise UserError("--use_8bit_adam and --use_lion_optimizer cannot be combined: give one (or --optimizer_type)")
        if given:
            raise UserError(f"--use_8bit_adam cannot be combined with --optimizer_type {given}: "
                            "drop one (--use_8bit_adam means --optimizer_type AdamW8bit)")
        return "AdamW8bit"
    if use_lion_optimizer:
        if given:
            raise UserError(f"--use_lion_optimizer cannot be combined with --optimizer_type {given}: "
                            "drop one (--use_lion_optimizer means --optimizer_type Lion)")
        return "Lion"
    return given or DEFAULT_OPTIMIZER


def _builtin_class(entry: OptimizerEntry) -> Callable[..., Any]:
    """Import a built-in's class lazily, with the documented one-line errors."""
    what = f"--optimizer_type {entry.name}"
    module = import_optional(entry.module, what)
    cls = getattr(module, entry.attr, None)
    if cls is None:
        top = entry.module.split(".")[0]
        hint = entry.missing_hint or f"the installed '{PIP_NAMES.get(top, top)}' has no {entry.attr}; try upgrading it"
        raise UserError(f"{what} {hint}")
    return cls


@dataclass(frozen=True)
class BuiltOptimizer:
    """A constructed optimizer and what the run must record or apply because of it.

    * ``name``: class path ``<module>.<class>``, e.g. ``torch.optim.adamw.AdamW``.
    * ``args``: the keyword arguments recorded (after inserted defaults such as ``momentum=0.9`` or
      ``relative_step=True``); ``args_text`` is their metadata form.
    * ``learning_rate``: the value of ``--learning_rate`` to record and use from now on (None for
      relative-step AdaFactor).
    * ``group_lrs_cleared``: relative-step AdaFactor removed per-group lrs, so ``--unet_lr`` and
      ``--text_encoder_lr`` are to be recorded as None.
    * ``lr_scheduler``: when not None, it replaces ``--lr_scheduler`` (``adafactor:<initial lr>``).
    """

    optimizer: torch.optim.Optimizer
    name: str
    args: Mapping[str, Any]
    learning_rate: float | None
    group_lrs_cleared: bool = False
    lr_scheduler: str | None = None

    @property
    def args_text(self) -> str:
        """``k=v,k=v`` of :attr:`args` (empty when there are none)."""
        return format_optimizer_args(self.args)

    @property
    def description(self) -> str:
        """The ``ss_optimizer`` metadata value: class path plus ``(k=v,...)`` when there are arguments."""
        text = self.args_text
        return f"{self.name}({text})" if text else self.name


def build_optimizer(
    name: str | None,
    params: Iterable[Any],
    lr: float | None,
    optimizer_args: Sequence[str] | None = None,
    *,
    use_8bit_adam: bool = False,
    use_lion_optimizer: bool = False,
    max_grad_norm: float = 1.0,
    lr_scheduler: str = "constant",
) -> BuiltOptimizer:
    """Build the optimizer named by ``--optimizer_type`` (or the legacy flags) over ``params``.

    ``params`` is a flat parameter list or a list of parameter-group dicts (each may carry its own
    ``lr``); the caller's dicts are not modified. ``lr`` is ``--learning_rate``. ``max_grad_norm`` and
    ``lr_scheduler`` are only read for AdaFactor's recommendations. The class is constructed as
    ``Class(params, lr=lr, **fixed, **optimizer_args)``; gradient clipping is the training loop's job
    (``--max_grad_norm``, never skipped here). User mistakes (unknown name, missing package, arguments
    the class rejects) raise UserError.
    """
    resolved = resolve_optimizer_name(name, use_8bit_adam=use_8bit_adam, use_lion_optimizer=use_lion_optimizer)
    kwargs = parse_optimizer_args(optimizer_args)
    plan = _Plan(name=resolved, params=list(params), lr=lr, kwargs=kwargs, max_grad_norm=max_grad_norm,
                 lr_scheduler=lr_scheduler, learning_rate=lr)

    entry = BUILTIN_OPTIMIZERS.get(resolved.lower())
    if entry is not None:
        plan.name = entry.name
        cls = _builtin_class(entry)
        fixed: Mapping[str, Any] = entry.fixed
        if entry.prepare is not None:
            entry.prepare(plan)
    else:
        cls = import_class(resolved, default_module="torch.optim", option="--optimizer_type",
                           unknown_hint=_unknown_hint())
        fixed = {}

    logger.info("optimizer %s (%s.%s) | %s", plan.name, cls.__module__, getattr(cls, "__name__", cls), plan.kwargs)
    try:
        optimizer = cls(plan.params, lr=plan.lr, **fixed, **plan.kwargs)
    except (TypeError, ValueError) as exc:
        shown = format_optimizer_args(plan.kwargs) or "none"
        raise UserError(
            f"--optimizer_type {plan.name}: cannot build it with --learning_rate {plan.lr} and "
            f"--optimizer_args {shown}: {exc}"
        ) from exc
    class_path = f"{cls.__module__}.{getattr(cls, '__name__', type(cls).__name__)}"
    return BuiltOptimizer(
        optimizer=optimizer,
        name=class_path,
        args=dict(plan.kwargs),
        learning_rate=plan.learning_rate,
        group_lrs_cleared=plan.group_lrs_cleared,
        lr_scheduler=plan.scheduler_override,
    )
