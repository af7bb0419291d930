"""The layers of docs/architecture.md, held: no import goes up a layer, and no cycles.

Every ``import`` in the project's packages is read from the source (imports inside
functions and under ``TYPE_CHECKING`` included: a deferred import is still a dependency),
so a move that crosses a layer the wrong way fails here, naming the file, the line and
the rule it breaks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top. A module may import its own layer's package and any package below it,
# except where ALSO_FORBIDDEN says otherwise.
LAYERS: list[tuple[str, set[str]]] = [
    ("ground", {"batchscore.core"}),
    ("libraries", {"scoring", "registry", "kv_export"}),
    ("service", {"lookup"}),
    ("steps", {"jobs"}),
    (
        "top",
        {
            "batchscore.cli",
            "batchscore.demo",
            "batchscore.devcluster",
            "batchscore.samples",
            "batchscore.testing",
            "batchscore_dags",
            "batchscore_pipeline",
            "batchscore_jobs",
            "batchscore_job_configs",
        },
    ),
]
# The three libraries know nothing of each other: each is usable alone.
SIBLINGS_APART = {"scoring", "registry", "kv_export"}
# jobs scores and exports; it does not serve lookups.
ALSO_FORBIDDEN = {"jobs": {"lookup"}}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a project module)
    path: Path
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "dags":  # Airflow puts dags/ on sys.path
        rel = rel.relative_to("dags")
    name = ".".join(rel.with_suffix("").parts)
    return name.removesuffix(".__init__")


def project_files() -> list[Path]:
    roots = ["batchscore", "scoring", "registry", "kv_export", "lookup", "jobs", "dags"]
    return sorted(p for r in roots for p in (ROOT / r).rglob("*.py"))


MODULES = {module_name(p): p for p in project_files()}


def package_of(module: str) -> str | None:
    """The layer package that holds ``module`` (the longest prefix listed in LAYERS)."""
    best = None
    for _, packages in LAYERS:
        for package in packages:
            if module == package or module.startswith(package + "."):
                if best is None or len(package) > len(best):
                    best = package
    return best


def layer_of(package: str) -> int:
    return next(i for i, (_, packages) in enumerate(LAYERS) if package in packages)


def resolve(name: str) -> str | None:
    """The project module an import of ``name`` loads (its deepest existing module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, source: str | None = None) -> Iterator[Import]:
    source = source or module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from jobs import steps`` loads jobs.steps; ``from jobs.x import f`` loads jobs.x.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            target = resolve(name)
            if target is not None and target != source:
                yield Import(source, target, path, node.lineno)


def all_imports() -> list[Import]:
    return [imp for path in project_files() for imp in imports_of(path)]


def layer_violations(imports: list[Import]) -> list[str]:
    wrong = []
    for imp in imports:
        src, dst = package_of(imp.source), package_of(imp.target)
        if src is None or dst is None or src == dst:
            continue
        where = f"{imp.path.name}:{imp.line}: {imp.source} imports {imp.target}"
        if layer_of(dst) > layer_of(src):
            wrong.append(f"{where} ({dst} is above {src})")
        elif src in SIBLINGS_APART and dst in SIBLINGS_APART:
            wrong.append(f"{where} (libraries do not import each other)")
        elif dst in ALSO_FORBIDDEN.get(src, set()):
            wrong.append(f"{where} ({src} may not import {dst})")
    return wrong


def import_cycles(imports: list[Import]) -> list[set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
    return [c for c in strongly_connected(graph) if len(c) > 1]


def test_every_project_module_belongs_to_a_layer() -> None:
    unplaced = sorted(m for m in MODULES if package_of(m) is None and m != "batchscore")
    assert not unplaced, f"modules in no layer of docs/architecture.md: {unplaced}"


def test_no_import_goes_up_a_layer_or_across_libraries() -> None:
    wrong = layer_violations(all_imports())
    assert not wrong, "imports that cross a layer the wrong way:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    cycles = import_cycles(all_imports())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_the_rules_bite(tmp_path: Path) -> None:
    """A deferred upward import, a library importing a sibling, and a two-module cycle
    are each reported, with the file and line of the import."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\n\n\ndef f():\n    from jobs import steps\n    import registry.errors\n"
    )
    found = layer_violations(list(imports_of(probe, source="scoring.probe")))
    assert found == [
        "probe.py:5: scoring.probe imports jobs.steps (jobs is above scoring)",
        "probe.py:6: scoring.probe imports registry.errors (libraries do not import each other)",
    ]
    back = Import("batchscore.core.errors", "batchscore.core.settings", probe, 1)
    fore = Import("batchscore.core.settings", "batchscore.core.errors", probe, 1)
    assert {"batchscore.core.errors", "batchscore.core.settings"} in import_cycles([back, fore])


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (the graph is a few hundred modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components
