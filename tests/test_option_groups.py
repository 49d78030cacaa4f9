"""The typed option groups (library/option_groups.py): every option of every training script has exactly one
field, the groups hold what the command line said, nothing can rewrite them, and no library code outside the
option layer reads the argparse Namespace."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import fine_tune
import train_db
import train_network
import train_textual_inversion
from library.option_groups import _GROUPS, OPTION_LAYER_ONLY, Options, group_of_option

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train_network": train_network, "train_db": train_db, "fine_tune": fine_tune,
           "train_textual_inversion": train_textual_inversion}

#: modules that register, parse and check options: the only library code that reads the Namespace
OPTION_LAYER = {"library/option_groups.py", "library/options.py", "library/cli.py", "library/training/args.py",
                "library/training/bounds.py", "library/config/option_file.py", "library/config/arguments.py"}


def _is_option_layer_function(name: str) -> bool:
    return ((name.startswith("add_") and name.endswith(("_arguments", "_argument"))) or name.endswith("_problems")
            or name.startswith("validate_"))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_option_has_exactly_one_field(script):
    parser = SCRIPTS[script].build_parser()
    names = [a.dest for a in parser._actions if a.dest != "help"]
    for name in names:
        if name in OPTION_LAYER_ONLY:
            continue
        owners = [g for g, cls in _GROUPS.items() if name in {f.name for f in dataclasses.fields(cls)}]
        assert len(owners) == 1, f"--{name}: in groups {owners}; give it one field in one group"


def test_every_field_is_an_option_of_some_script():
    known = {a.dest for m in SCRIPTS.values() for a in m.build_parser()._actions}
    for group_name, cls in _GROUPS.items():
        for f in dataclasses.fields(cls):
            assert f.name in known, f"{cls.__name__}.{f.name} is no option of any training script"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_field_defaults_are_the_parser_defaults(script):
    """An option the script has gets its parsed value; with no flags that is the parser's default, so the
    field default (used where a script lacks the option) must not contradict it unless scripts differ."""
    parser = SCRIPTS[script].build_parser()
    args = parser.parse_args([])
    opts = Options.from_args(args)
    for name, value in vars(args).items():
        if name in OPTION_LAYER_ONLY:
            continue
        got = opts.option(name)
        assert got == (tuple(value) if isinstance(value, list) else value), name
        field = next(f for f in dataclasses.fields(_GROUPS[group_of_option(name)]) if f.name == name)
        defaults = {repr(a.default) for m in SCRIPTS.values() for a in m.build_parser()._actions if a.dest == name}
        if len(defaults) == 1:  # the same default in every script: the field says it too
            assert field.default == value, f"{name}: field default {field.default!r}, parser default {value!r}"


def test_groups_carry_the_command_line_and_are_frozen():
    args = train_network.build_parser().parse_args(
        ["--network_args", "conv_dim=4", "conv_alpha=1", "--ema_decay", "0.99", "--cache_latents_to_disk",
         "--dry_run_json", "plan.json", "--learning_rate", "3e-4"])
    opts = Options.from_args(args)
    assert opts.network.network_args == ("conv_dim=4", "conv_alpha=1")  # lists become tuples
    assert opts.ema.ema_decay == 0.99 and opts.optimizer.learning_rate == 3e-4
    assert opts.data.latents_cached and opts.dry_run.requested
    assert "network_dim" in opts.given and "stop_text_encoder_training" not in opts.given
    assert opts.dreambooth.stop_text_encoder_training is None  # not a train_network option: the field default
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.ema.ema_decay = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.ema = None  # type: ignore[misc]
    assert opts.command_line()["ema_decay"] == 0.99 and "stop_text_encoder_training" not in opts.command_line()


def test_legacy_caption_extension_spelling_wins():
    parser = train_db.build_parser()
    assert Options.from_args(parser.parse_args(["--caption_extension", ".txt"])).data.caption_extension_in_effect \
        == ".txt"
    opts = Options.from_args(parser.parse_args(["--caption_extension", ".txt", "--caption_extention", ".cap"]))
    assert opts.data.caption_extension_in_effect == ".cap"


def _namespace_readers(path: Path) -> list[str]:
    """Functions of ``path`` outside the option layer that read options from the Namespace (``args.x``,
    getattr/hasattr); handing it to the option layer (``validate_training_args(args)``, ``Options.from_args``)
    is allowed."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_option_layer_function(node.name):
            continue
        for arg in node.args.args + node.args.kwonlyargs:
            annotation = ast.unparse(arg.annotation) if arg.annotation else ""
            reads_options = any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == arg.arg
                                and group_of_option(n.attr) for n in ast.walk(node))
            if reads_options and ("Namespace" in annotation or arg.arg == "args"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}({arg.arg})")
        for n in ast.walk(node):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("getattr", "hasattr")
                    and n.args and isinstance(n.args[0], ast.Name) and n.args[0].id in ("args", "opts")):
                found.append(f"{path.relative_to(REPO)}:{n.lineno} {n.func.id}({n.args[0].id}, ...)")
    return found


def test_no_library_code_outside_the_option_layer_reads_the_namespace():
    offenders = []
    for path in sorted((REPO / "library").rglob("*.py")):
        if str(path.relative_to(REPO)) not in OPTION_LAYER:
            offenders += _namespace_readers(path)
    assert offenders == [], "\n".join(offenders)
