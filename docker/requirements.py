"""Print the project's requirements from pyproject.toml, one per line, for ``pip install -r``.

The image installs the dependencies in a layer of their own, before the source is
copied, so that editing the code does not reinstall torch and Airflow. Usage:
``python docker/requirements.py [EXTRA ...] > requirements.txt``.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        known = ", ".join(sorted(optional))
        raise SystemExit(f"unknown extra {', '.join(unknown)} in {pyproject}; known: {known}")
    found = list(project["dependencies"])
    for extra in extras:
        found.extend(optional[extra])
    return found


if __name__ == "__main__":
    here = Path(__file__).resolve().parents[1] / "pyproject.toml"
    print("\n".join(requirements(here, sys.argv[1:])))
