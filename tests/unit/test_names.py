"""The one namespace rule, and that every edge uses it (the same object, not a copy)."""

from __future__ import annotations

import re
import subprocess

import pytest

from batchscore.core.errors import InvalidName
from batchscore.core.names import (
    NAMESPACE_PATTERN,
    NAMESPACE_RE,
    NAMESPACE_RULE,
    check_namespace,
)
from tests.conftest import BIN

GOOD = ["churn", "c", "Churn_daily-2", "churn.v2", "0day", "n" * 128, "a.b.c", "a_", "a-"]
BAD = ["../../x", "/abs", "a b", "..", ".", "", "n" * 129, ".hidden", "-x", "_x", "a..b"]
BAD += ["a/b", "a\\b", "a:b", "a\nb", "ns\x00", "é", "churn\n"]


@pytest.mark.parametrize("name", GOOD)
def test_valid_namespaces(name: str) -> None:
    assert check_namespace(name) == name


@pytest.mark.parametrize("name", BAD)
def test_invalid_namespaces_name_the_field_and_the_rule(name: str) -> None:
    with pytest.raises(InvalidName) as refused:
        check_namespace(name, field="--namespace")
    message = str(refused.value)
    assert message.startswith("The --namespace ") and NAMESPACE_RULE in message
    assert len(message) < 400


def test_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidName):
        check_namespace(None)


def test_the_rule_is_a_subset_of_what_the_api_accepted() -> None:
    """Published namespaces stay servable: the API's former pattern accepts them all."""
    former = re.compile(r"[A-Za-z0-9._-]{1,128}")
    for name in GOOD:
        assert former.fullmatch(name)
    assert NAMESPACE_RE.pattern == NAMESPACE_PATTERN


def test_the_api_uses_the_rule() -> None:
    from lookup import app

    assert app.NAMESPACE_RE is NAMESPACE_RE


def test_the_rule_is_importable_without_heavy_modules() -> None:
    code = (
        "import sys, batchscore.core.names; "
        "print(sorted(m for m in ('pydantic', 'numpy', 'airflow', 'mlflow') if m in sys.modules))"
    )
    done = subprocess.run(
        [str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
