"""Optimizer table (training_options.md §4, §4.1-§4.3): real torch optimizers on a tiny nn.Linear."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from library.errors import UserError
from library.training.optim import (
    BuiltOptimizer,
    build_optimizer,
    format_optimizer_args,
    known_optimizer_names,
    parse_optimizer_args,
    resolve_optimizer_name,
)


def _model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def _step(built: BuiltOptimizer, model: torch.nn.Module) -> None:
    """One forward/backward/step; asserts the weights moved."""
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(2, 4)).pow(2).sum()
    loss.backward()
    built.optimizer.step()
    built.optimizer.zero_grad(set_to_none=True)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- §4.1 key=value parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item, expected",
    [
        ("weight_decay=0.01", 0.01),
        ("betas=0.9,0.999", (0.9, 0.999)),
        ("relative_step=True", True),
        ("eps=1e-8", 1e-8),
        ("foo=[1,2]", [1, 2]),
        ('name="x"', "x"),
        ("beta1=None", None),
        ("steps=10", 10),
        ('name="a=b"', "a=b"),
        ("decouple=yes", "yes"),  # not a literal: kept as the string
    ],
)
def test_parse_value_kinds(item: str, expected: object) -> None:
    key = item.split("=", 1)[0]
    parsed = parse_optimizer_args([item])
    assert parsed == {key: expected}
    assert type(parsed[key]) is type(expected)


def test_parse_several_items_keeps_order_and_last_duplicate_wins() -> None:
    parsed = parse_optimizer_args(["weight_decay=0.1", "betas=0.9,0.99", "weight_decay=0.2"])
    assert parsed == {"weight_decay": 0.2, "betas": (0.9, 0.99)}
    assert parse_optimizer_args(None) == {} and parse_optimizer_args([]) == {}


@pytest.mark.parametrize("item", ["weight_decay", "=0.1"])
def test_parse_rejects_items_without_key_value(item: str) -> None:
    with pytest.raises(UserError, match=r"^--optimizer_args: '.*' is not key=value") as info:
        parse_optimizer_args([item])
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="^--lr_scheduler_args"):
        parse_optimizer_args([item], option="--lr_scheduler_args")


def test_format_matches_metadata_form() -> None:
    kwargs = parse_optimizer_args(["weight_decay=0.01", "betas=0.9,0.999"])
    assert format_optimizer_args(kwargs) == "weight_decay=0.01,betas=(0.9, 0.999)"
    assert format_optimizer_args({}) == ""


# --- names and legacy flags -------------------------------------------------------------------------


def test_resolve_names_and_legacy_flags() -> None:
    assert resolve_optimizer_name("") == "AdamW"
    assert resolve_optimizer_name(None) == "AdamW"
    assert resolve_optimizer_name("Lion") == "Lion"
    assert resolve_optimizer_name("", use_8bit_adam=True) == "AdamW8bit"
    assert resolve_optimizer_name(None, use_lion_optimizer=True) == "Lion"


@pytest.mark.parametrize(
    "name, eight, lion, pattern",
    [
        ("", True, True, r"^--use_8bit_adam and --use_lion_optimizer cannot be combined"),
        ("AdamW", True, False, r"^--use_8bit_adam cannot be combined with --optimizer_type AdamW"),
        ("Lion", False, True, r"^--use_lion_optimizer cannot be combined with --optimizer_type Lion"),
    ],
)
def test_legacy_flag_conflicts(name: str, eight: bool, lion: bool, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        build_optimizer(name, _model().parameters(), 1e-3, None, use_8bit_adam=eight, use_lion_optimizer=lion)


def test_default_is_adamw_and_names_are_case_insensitive() -> None:
    for name in ("", "AdamW", "adamw", "ADAMW"):
        model = _model()
        built = build_optimizer(name, model.parameters(), 1e-3, None)
        assert isinstance(built.optimizer, torch.optim.AdamW)
        assert built.description == "torch.optim.adamw.AdamW"
        assert built.learning_rate == 1e-3 and built.lr_scheduler is None
        _step(built, model)


def test_adamw_args_reach_the_optimizer_and_the_description() -> None:
    model = _model()
    built = build_optimizer("AdamW", model.parameters(), 1e-3, ["weight_decay=0.1", "betas=0.9,0.99"])
    group = built.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1 and group["betas"] == (0.9, 0.99) and group["lr"] == 1e-3
    assert built.description == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"
    _step(built, model)


def test_param_groups_keep_their_lrs() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = [{"params": list(a.parameters()), "lr": 1e-4}, {"params": list(b.parameters())}]
    built = build_optimizer("AdamW", groups, 1e-3, None)
    assert [g["lr"] for g in built.optimizer.param_groups] == [1e-4, 1e-3]


# --- §4.2 built-ins ---------------------------------------------------------------------------------

_OPTIONAL = [
    ("Lion", "lion_pytorch", "lion_pytorch.lion_pytorch.Lion", 1e-4),
    ("DAdaptation", "dadaptation", "dadaptation.dadapt_adam.DAdaptAdam", 1.0),
    ("DAdaptAdam", "dadaptation", "dadaptation.dadapt_adam.DAdaptAdam", 1.0),
    ("DAdaptAdaGrad", "dadaptation", "dadaptation.dadapt_adagrad.DAdaptAdaGrad", 1.0),
    ("DAdaptAdan", "dadaptation", "dadaptation.dadapt_adan.DAdaptAdan", 1.0),
    ("DAdaptSGD", "dadaptation", "dadaptation.dadapt_sgd.DAdaptSGD", 1.0),
    ("DAdaptLion", "dadaptation", "dadaptation.dadapt_lion.DAdaptLion", 1.0),
    ("DAdaptAdanIP", "dadaptation", "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP", 1.0),
    ("Prodigy", "prodigyopt", "prodigyopt.prodigy.Prodigy", 1.0),
]


@pytest.mark.parametrize("name, module, class_path, lr", _OPTIONAL)
def test_optional_builtins_build_and_step(name: str, module: str, class_path: str, lr: float) -> None:
    model = _model()
    if not _has(module):
        pip = {"lion_pytorch": "lion-pytorch"}.get(module, module)
        with pytest.raises(UserError, match=rf"^--optimizer_type {name} needs the package '{pip}' \(pip install {pip}\)$"):
            build_optimizer(name.lower(), model.parameters(), lr, None)
        return
    built = build_optimizer(name.lower(), model.parameters(), lr, None)
    assert built.name == class_path and built.description == class_path
    _step(built, model)


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "SGDNesterov8bit"])
def test_bitsandbytes_builtins(name: str) -> None:
    model = _model()
    if not _has("bitsandbytes"):
        with pytest.raises(UserError) as info:
            build_optimizer(name, model.parameters(), 1e-3, None)
        assert str(info.value) == f"--optimizer_type {name} needs the package 'bitsandbytes' (pip install bitsandbytes)"
        return
    try:  # installed: CPU support depends on the version; either it works or it says why in one line
        built = build_optimizer(name, model.parameters(), 1e-3, None)
    except UserError as exc:
        assert str(exc).startswith(f"--optimizer_type {name}") and "\n" not in str(exc)
        return
    assert built.name.startswith("bitsandbytes.optim.")


def test_sgd_nesterov_inserts_momentum() -> None:
    model = _model()
    built = build_optimizer("sgdnesterov", model.parameters(), 0.1, None)
    group = built.optimizer.param_groups[0]
    assert isinstance(built.optimizer, torch.optim.SGD)
    assert group["nesterov"] is True and group["momentum"] == 0.9
    assert built.description == "torch.optim.sgd.SGD(momentum=0.9)"
    _step(built, model)
    built = build_optimizer("SGDNesterov", _model().parameters(), 0.1, ["momentum=0.5"])
    assert built.optimizer.param_groups[0]["momentum"] == 0.5
    assert built.args_text == "momentum=0.5"


def test_dadapt_warns_about_low_and_mixed_lrs(caplog: pytest.LogCaptureFixture) -> None:
    if not _has("dadaptation"):
        pytest.skip("dadaptation is not installed")
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = [{"params": list(a.parameters()), "lr": 1e-4}, {"params": list(b.parameters()), "lr": 1.0}]
    with caplog.at_level(logging.WARNING, logger="library.training.optim"):
        build_optimizer("DAdaptAdam", groups, 1.0, None)
    text = caplog.text
    assert "looks too low" in text and "only the first group's" in text


# --- AdaFactor relative_step rules --------------------------------------------------------------------


def test_adafactor_relative_step_default() -> None:
    model = _model()
    built = build_optimizer("AdaFactor", model.parameters(), 1e-3, None)
    assert type(built.optimizer).__name__ == "Adafactor"
    assert built.optimizer.defaults["lr"] is None and built.optimizer.defaults["relative_step"] is True
    assert built.learning_rate is None
    assert built.lr_scheduler == "adafactor:0.001"
    assert built.description == "transformers.optimization.Adafactor(relative_step=True)"
    assert built.group_lrs_cleared is False
    _step(built, model)


def test_adafactor_relative_step_drops_group_lrs_without_touching_the_callers_dicts() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = [{"params": list(a.parameters()), "lr": 1e-4}, {"params": list(b.parameters()), "lr": 1e-5}]
    built = build_optimizer("adafactor", groups, 2e-6, None)
    assert built.group_lrs_cleared is True
    assert all(g["lr"] is None for g in built.optimizer.param_groups)
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == 1e-5
    assert built.lr_scheduler == "adafactor:2e-06"


def test_adafactor_without_relative_step_keeps_lr_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    with caplog.at_level(logging.WARNING, logger="library.training.optim"):
        built = build_optimizer("AdaFactor", model.parameters(), 1e-3,
                                ["relative_step=False", "scale_parameter=False", "clip_threshold=2.0"],
                                max_grad_norm=1.0, lr_scheduler="constant")
    assert built.learning_rate == 1e-3 and built.lr_scheduler is None
    assert built.optimizer.param_groups[0]["lr"] == 1e-3
    assert "--max_grad_norm 0" in caplog.text
    assert "constant_with_warmup" in caplog.text and "clip_threshold=1.0" in caplog.text
    _step(built, model)


def test_adafactor_warmup_init_forces_relative_step() -> None:
    built = build_optimizer("AdaFactor", _model().parameters(), 1e-3, ["relative_step=False", "warmup_init=True"])
    assert built.optimizer.defaults["relative_step"] is True
    assert built.args["relative_step"] is True
    assert built.lr_scheduler == "adafactor:0.001" and built.learning_rate is None


# --- §4.3 arbitrary classes ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RMSprop", "torch.optim.RMSprop"])
def test_module_class_path_with_args(name: str) -> None:
    model = _model()
    built = build_optimizer(name, model.parameters(), 1e-3, ["alpha=0.9", "momentum=0.1"])
    assert isinstance(built.optimizer, torch.optim.RMSprop)
    group = built.optimizer.param_groups[0]
    assert group["alpha"] == 0.9 and group["momentum"] == 0.1 and group["lr"] == 1e-3
    assert built.description == "torch.optim.rmsprop.RMSprop(alpha=0.9,momentum=0.1)"
    _step(built, model)


def test_unknown_name_lists_the_known_names() -> None:
    with pytest.raises(UserError) as info:
        build_optimizer("NoSuchOptimizer", _model().parameters(), 1e-3, None)
    message = str(info.value)
    assert message.startswith("unknown --optimizer_type 'NoSuchOptimizer': use one of ")
    assert all(name in message for name in known_optimizer_names())
    assert "\n" not in message


def test_lowercase_torch_module_is_not_a_class() -> None:
    with pytest.raises(UserError, match=r"^unknown --optimizer_type 'rmsprop'"):
        build_optimizer("rmsprop", _model().parameters(), 1e-3, None)


def test_module_that_cannot_be_imported() -> None:
    with pytest.raises(UserError) as info:
        build_optimizer("nosuchpkg.Opt", _model().parameters(), 1e-3, None)
    assert str(info.value).startswith("--optimizer_type nosuchpkg.Opt: cannot import module 'nosuchpkg'")
    assert "\n" not in str(info.value)


def test_missing_class_in_existing_module() -> None:
    with pytest.raises(UserError, match=r"^--optimizer_type torch\.optim\.Nope: module 'torch\.optim' has no class 'Nope'$"):
        build_optimizer("torch.optim.Nope", _model().parameters(), 1e-3, None)


@pytest.mark.parametrize("args", [["nonsense=1"], ["lr=0.1"], ["betas=oops"]])
def test_arguments_the_class_rejects(args: list[str]) -> None:
    with pytest.raises(UserError, match=r"^--optimizer_type AdamW: cannot build it with --learning_rate 0\.001 "
                                        r"and --optimizer_args "):
        build_optimizer("AdamW", _model().parameters(), 1e-3, args)
