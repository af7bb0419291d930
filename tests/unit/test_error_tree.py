"""The error tree drawn in batchscore/core/errors.py is the real one.

Every exception class of the project (read from the source, so nothing needs importing)
that descends from ``BatchscoreError`` or the lookup API's ``ApiError`` appears in the
drawing under its real parent, and the drawing names no class that does not exist.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import batchscore.core.errors

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["batchscore", "scoring", "registry", "kv_export", "lookup", "jobs", "dags"]
ROOTS = {"BatchscoreError", "ApiError"}


def declared_parents() -> dict[str, str]:
    """Class name → its first base's name, for every class in the project's packages."""
    parents: dict[str, str] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.bases:
                    base = node.bases[0]
                    name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                    assert node.name not in parents or parents[node.name] == name, (
                        f"two classes named {node.name}: the tree could not tell them apart"
                    )
                    parents[node.name] = name
    return parents


def errors_in_code() -> dict[str, str]:
    parents = declared_parents()

    def is_error(name: str) -> bool:
        seen = set()
        while name in parents and name not in seen:
            seen.add(name)
            if name in ROOTS:
                return True
            name = parents[name]
        return name in ROOTS

    return {
        name: parent for name, parent in parents.items() if is_error(name) and name not in ROOTS
    }


def errors_in_drawing(doc: str | None = None) -> dict[str, str]:
    """Parse the docstring's tree: each ``── Name`` line's parent is the nearest line above
    it drawn one level shallower."""
    doc = (batchscore.core.errors.__doc__ or "") if doc is None else doc
    drawn: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        root = re.match(r"\s*(\w+)(\s|$)", line)
        if root and root.group(1) in ROOTS:
            stack = [(-1, root.group(1))]
            continue
        match = re.match(r"^(.*?)[├└]── ([\w.]+)", line)
        if not match or not stack:
            continue
        depth, name = len(match.group(1)), match.group(2).rsplit(".", 1)[-1]
        while stack and stack[-1][0] >= depth:
            stack.pop()
        drawn[name] = stack[-1][1]
        stack.append((depth, name))
    return drawn


def test_every_error_class_is_drawn_under_its_parent() -> None:
    code, drawn = errors_in_code(), errors_in_drawing()
    missing = sorted(set(code) - set(drawn))
    assert not missing, f"error classes missing from batchscore/core/errors.py's tree: {missing}"
    wrong = {n: (drawn[n], code[n]) for n in code if drawn[n] != code[n]}
    assert not wrong, f"drawn under the wrong parent (drawn, real): {wrong}"


def test_the_drawing_names_no_class_that_does_not_exist() -> None:
    extra = sorted(set(errors_in_drawing()) - set(errors_in_code()))
    assert not extra, f"the tree draws classes the code does not have: {extra}"


def test_the_drawing_is_read_by_depth() -> None:
    drawing = """
        BatchscoreError      root
        ├── StoreError       (kv_export.errors)
        │   ├── StoreUnavailable
        │   │   └── CircuitOpen
        │   └── BadStoreUrl
        └── RunError
    """
    assert errors_in_drawing(drawing) == {
        "StoreError": "BatchscoreError",
        "StoreUnavailable": "StoreError",
        "CircuitOpen": "StoreUnavailable",
        "BadStoreUrl": "StoreError",
        "RunError": "BatchscoreError",
    }
