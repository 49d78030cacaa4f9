"""Per-module rules for :mod:`networks.lora` (``--network_args module_rules=<file.toml>``).

The file holds ``[[rule]]`` tables, tried in order; the first whose ``pattern`` (a Python regular
expression, ``re.search``) matches a module's LoRA name (``lora_unet_up_blocks_1_attentions_0_…``,
``lora_te_text_model_encoder_layers_0_…``) decides for that module::

    [[rule]]
    pattern = "lora_unet_up_blocks_1_.*attn2"
    dim = 16          # rank (integer >= 1)
    alpha = 8         # alpha (number >= 0; 0 = the rank)
    lr = 2e-4         # absolute learning rate of the module's weights (number > 0)

    [[rule]]
    pattern = "lora_te_.*mlp"
    exclude = true    # no module for these layers

Keys left out keep the network's values. Any mistake is a :class:`~library.errors.UserError` naming the
file, the rule and the key.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import UserError

RULE_KEYS = ("pattern", "dim", "alpha", "lr", "exclude")


@dataclass(frozen=True)
class ModuleRule:
    """One ``[[rule]]``: the compiled pattern and the values it sets (None: not set)."""

    pattern: str
    regex: re.Pattern
    dim: int | None = None
    alpha: float | None = None
    lr: float | None = None
    exclude: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The keys the rule sets, as written in the file (for the metadata)."""
        out: dict[str, Any] = {"pattern": self.pattern}
        for key in ("dim", "alpha", "lr"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.exclude:
            out["exclude"] = True
        return out


@dataclass
class ModuleRules:
    """The rules of one file, in order; :meth:`match` gives the first that matches a name."""

    path: str
    rules: list[ModuleRule]

    def match(self, lora_name: str) -> ModuleRule | None:
        """The first rule whose pattern ``re.search``-matches ``lora_name``, or None."""
        for rule in self.rules:
            if rule.regex.search(lora_name):
                return rule
        return None

    def unused(self, names: list[str]) -> list[ModuleRule]:
        """Rules that decide for none of ``names`` (a typo in a pattern, or shadowed by an earlier rule)."""
        used = {id(r) for r in (self.match(n) for n in names) if r is not None}
        return [r for r in self.rules if id(r) not in used]

    def to_json(self) -> str:
        """The rules as a JSON list (stored in ``ss_network_args`` beside the file name)."""
        return json.dumps([r.as_dict() for r in self.rules])


def _error(path: str, where: str, what: str) -> UserError:
    return UserError(f"--network_args module_rules={path}: {where}: {what}")


def _number(path: str, where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(path, where, f"'{key}' must be a number, got {value!r}")
    return float(value)


def _parse_rule(path: str, index: int, table: Any) -> ModuleRule:
    """One ``[[rule]]`` table, checked."""
    where = f"rule {index}"
    if not isinstance(table, dict):
        raise _error(path, where, "each [[rule]] must be a table")
    unknown = sorted(set(table) - set(RULE_KEYS))
    if unknown:
        raise _error(path, where, f"unknown key '{unknown[0]}' (allowed: {', '.join(RULE_KEYS)})")
    pattern = table.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise _error(path, where, "'pattern' (a regular expression, as a string) is required")
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise _error(path, where, f"'pattern' {pattern!r} is not a valid regular expression ({exc})") from None
    dim = table.get("dim")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise _error(path, where, f"'dim' must be an integer >= 1 (use exclude = true for no module), got {dim!r}")
    alpha = table.get("alpha")
    if alpha is not None:
        alpha = _number(path, where, "alpha", alpha)
        if alpha < 0:
            raise _error(path, where, f"'alpha' must be >= 0, got {alpha:g}")
    lr = table.get("lr")
    if lr is not None:
        lr = _number(path, where, "lr", lr)
        if lr <= 0:
            raise _error(path, where, f"'lr' must be > 0 (use exclude = true to leave layers out), got {lr:g}")
    exclude = table.get("exclude", False)
    if not isinstance(exclude, bool):
        raise _error(path, where, f"'exclude' must be true or false, got {exclude!r}")
    if exclude and any(table.get(k) is not None for k in ("dim", "alpha", "lr")):
        raise _error(path, where, "'exclude = true' cannot be combined with dim, alpha or lr")
    return ModuleRule(pattern, regex, dim, alpha, lr, exclude)


def load_module_rules(path: str | Path) -> ModuleRules:
    """Read and check a rules file (UserError naming the file, the rule and the key)."""
    import toml

    name = str(path)
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--network_args module_rules={name}: " + ("is a folder" if file.is_dir() else "no such file")
                        + "; give a .toml file with [[rule]] tables")
    try:
        data = toml.loads(file.read_text(encoding="utf-8"))
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--network_args module_rules={name}: not valid TOML ({str(exc).splitlines()[0]})") from None
    extra = sorted(set(data) - {"rule"})
    if extra:
        raise _error(name, "top level", f"unknown key '{extra[0]}' (the file holds only [[rule]] tables)")
    tables = data.get("rule")
    if not isinstance(tables, list) or not tables:
        raise _error(name, "top level", "no [[rule]] tables found")
    return ModuleRules(name, [_parse_rule(name, i, t) for i, t in enumerate(tables, start=1)])
