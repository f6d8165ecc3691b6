"""Print the import graph of the `ldm` package and check its layering.

Layers, top to bottom: `ldm.cli` -> `ldm.stages.*` (one module per command) -> library modules (spec,
layout, checkpoint, recipe, models, data, metrics, diffusion, sampling, ...). Rules: no stage imports
another stage, no library module imports a stage, nothing imports `ldm.cli`. Every import counts,
including those inside functions (read from the source, nothing is imported).

    python scripts/import_graph.py            # the graph, one module per line, and the verdict
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ldm"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the `ldm` modules it imports (a `from pkg import name` of a submodule counts as that one)."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def is_stage(module: str) -> bool:
    return module.startswith("ldm.stages.")


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target == "ldm.cli":
                out.append(f"{module} imports ldm.cli (nothing may)")
            elif is_stage(target) and is_stage(module):
                out.append(f"{module} imports another stage, {target}")
            elif is_stage(target) and module != "ldm.cli":
                out.append(f"library module {module} imports the stage {target}")
    return out


def longest_stage_chain(graph: dict[str, set[str]]) -> int:
    """Length of the longest chain of stage -> stage imports (0 when no stage imports another)."""
    stages = [m for m in graph if is_stage(m)]

    def depth(module: str, seen: frozenset) -> int:
        nxt = [t for t in graph[module] if is_stage(t) and t not in seen]
        return max((1 + depth(t, seen | {t}) for t in nxt), default=0)

    return max((depth(m, frozenset({m})) for m in stages), default=0)


def main() -> int:
    graph = import_graph()
    for module in sorted(graph):
        print(f"{module} -> {', '.join(sorted(graph[module])) or '-'}")
    found = violations(graph)
    print(f"\nstages: {sum(map(is_stage, graph))}; longest stage-to-stage import chain: {longest_stage_chain(graph)}; "
          f"modules importing ldm.cli: {sum('ldm.cli' in t for t in graph.values())}; violations: {len(found)}")
    for line in found:
        print("  " + line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
