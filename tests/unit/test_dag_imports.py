"""The DAG files and their helpers use Airflow's public interface only.

Airflow 3 promises stability for ``airflow.sdk`` (and ``airflow.sdk.exceptions``) and for
a provider's public modules; anything else (``airflow.models``, ``airflow.utils``,
``airflow.sdk.definitions``...) may move in a minor release, which would break the DAGs
in a deployment that upgrades Airflow within the range pyproject allows. Every import is
read, inside functions and under ``TYPE_CHECKING`` too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

DAGS = REPO / "dags"
PUBLIC = ("airflow.sdk", "airflow.sdk.exceptions")
# A provider's notifiers and sensors (public provider modules), e.g.
# airflow.providers.smtp.notifications.smtp, airflow.providers.standard.sensors.date_time.
PROVIDER_NOTIFIER = re.compile(
    r"^airflow\.providers\.[a-z_]+(\.[a-z_]+)*\.(notifications|sensors)\.[a-z_]+$"
)


def airflow_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of an ``airflow`` module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if _is_airflow(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _is_airflow(node.module):
                found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def _is_airflow(module: str) -> bool:
    return module == "airflow" or module.startswith("airflow.")


def dag_sources() -> list[Path]:
    return sorted(DAGS.rglob("*.py"))


def test_the_dags_import_only_public_airflow_modules() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in dag_sources()
        for line, module, _ in airflow_imports(path)
        if module not in PUBLIC and not PROVIDER_NOTIFIER.match(module)
    ]
    assert bad == [], (
        "import these from airflow.sdk (or airflow.sdk.exceptions, or a provider's "
        "notifications module) instead:\n  " + "\n  ".join(bad)
    )


def test_every_name_taken_from_airflow_sdk_is_in_its_public_api() -> None:
    """``from airflow.sdk import X`` works for some internals too (the lazy loader's
    table); ``__all__`` is the promise."""
    import airflow.sdk
    import airflow.sdk.exceptions

    public = {"airflow.sdk": set(airflow.sdk.__all__)}
    public["airflow.sdk.exceptions"] = {
        name for name in vars(airflow.sdk.exceptions) if not name.startswith("_")
    }
    bad = [
        f"{path.relative_to(REPO)}:{line}: {module}.{name}"
        for path in dag_sources()
        for line, module, names in airflow_imports(path)
        if module in public
        for name in names
        if name not in public[module]
    ]
    assert bad == []


def test_the_check_sees_private_imports(tmp_path: Path) -> None:
    """The rule above, applied to a file that breaks it in the ways seen before."""
    source = tmp_path / "dag.py"
    source.write_text(
        "from airflow.sdk import DAG\n"
        "def f():\n"
        "    from airflow.sdk.definitions.deadline import DeadlineAlert\n"
        "    import airflow.models\n"
        "    from airflow.providers.smtp.notifications.smtp import SmtpNotifier\n"
    )
    modules = [m for _, m, _ in airflow_imports(source)]
    assert modules == [
        "airflow.sdk",
        "airflow.sdk.definitions.deadline",
        "airflow.models",
        "airflow.providers.smtp.notifications.smtp",
    ]
    allowed = [m in PUBLIC or bool(PROVIDER_NOTIFIER.match(m)) for m in modules]
    assert allowed == [True, False, False, True]
