"""The layer rules of docs/architecture.md, checked on the real import graph (grimp; lazy imports inside
functions and ``TYPE_CHECKING`` imports count as imports)."""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("library", "networks", "finetune", "tools")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imports(graph: grimp.ImportGraph, importer: str, imported: str) -> set[tuple[str, str]]:
    """(module, module it imports) pairs from package ``importer`` into package ``imported``."""
    return {(m, d) for m in graph.modules if _within(m, importer)
            for d in graph.find_modules_directly_imported_by(m) if _within(d, imported)}


def test_no_import_cycle_anywhere(graph):
    cycles = {tuple(sorted((m, d))) for m in graph.modules for d in graph.find_modules_directly_imported_by(m)
              if graph.chain_exists(imported=m, importer=d)}
    assert not cycles, sorted(cycles)


def test_the_training_layer_knows_only_the_method_protocol(graph):
    assert {d for _, d in _imports(graph, "library.training", "library.methods")} <= {"library.methods.base"}
    for above in ("library.dry_run", "library.run_start"):
        assert not _imports(graph, "library.training", above), above


def test_methods_give_the_dry_run_its_plan_without_importing_the_report(graph):
    assert {d for _, d in _imports(graph, "library.methods", "library.dry_run")} <= {"library.dry_run.plan"}
    assert not _imports(graph, "library.methods", "library.run_start")
    assert not _imports(graph, "library.dry_run", "library.methods")  # plans are handed in


@pytest.mark.parametrize("lower", ["library.data", "library.models", "library.fileio", "library.errors",
                                   "library.output_safety", "library.distributed"])
def test_lower_layers_do_not_import_upward(graph, lower):
    for upper in ("library.training", "library.methods", "library.dry_run", "library.run_start"):
        assert not _imports(graph, lower, upper), (lower, upper, sorted(_imports(graph, lower, upper)))
