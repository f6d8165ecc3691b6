"""The package's layering holds: stages side by side, imports pointing down, no module too long."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

MAX_LINES = 400


def test_no_stage_imports_another_and_nothing_imports_cli():
    graph = import_graph.import_graph()
    assert any(import_graph.is_stage(m) for m in graph)
    assert import_graph.violations(graph) == []
    assert import_graph.longest_stage_chain(graph) == 0


def test_the_checker_sees_a_stage_importing_a_stage_and_a_library_importing_one():
    graph = {"ldm.stages.a": {"ldm.stages.b"}, "ldm.stages.b": {"ldm.stages.c"}, "ldm.stages.c": set(),
             "ldm.spec": {"ldm.stages.c", "ldm.cli"}, "ldm.cli": set()}
    found = import_graph.violations(graph)
    assert len(found) == 4 and import_graph.longest_stage_chain(graph) == 2


def test_function_level_and_relative_imports_are_seen(tmp_path):
    pkg = tmp_path / "ldm"
    (pkg / "stages").mkdir(parents=True)
    for name in ("__init__.py", "stages/__init__.py", "spec.py", "stages/b.py"):
        (pkg / name).write_text("")
    (pkg / "stages" / "a.py").write_text("def f():\n    from . import b\n    from ..spec import X\n")
    graph = import_graph.import_graph(pkg)
    assert graph["ldm.stages.a"] == {"ldm.stages.b", "ldm.spec"}


def test_every_command_is_one_stage_module_named_as_it():
    from ldm.cli import build_parser

    commands = {name.replace("-", "_") for name in build_parser()._subparsers._group_actions[0].choices}
    modules = {p.stem for p in (REPO / "ldm" / "stages").glob("*.py") if p.stem != "__init__"}
    assert commands == modules


def test_no_module_over_the_line_budget():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "ldm").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
