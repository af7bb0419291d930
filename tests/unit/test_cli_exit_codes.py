"""The exit code of each kind of error: what a script may rely on (``batchscore --help``)."""

from __future__ import annotations

import pytest
import requests

from batchscore.cli import ExitCode, exit_code
from batchscore.core.errors import BatchscoreError, DemoFailed, InvalidName, SettingsError
from jobs.errors import RunError
from kv_export.errors import (
    BadStoreUrl,
    NamespaceNotFound,
    StoreAuthFailed,
    StoreUnavailable,
    VersionNotFound,
)
from registry.errors import ModelNotFound, RegistryError
from scoring.errors import (
    DriftDetected,
    InputNotFound,
    MissingColumn,
    QualityConfigError,
    ShardFailed,
    TooManyNulls,
    UnsupportedModel,
    ValidationFailed,
)


def wrapped(cause: BaseException) -> Exception:
    """An error raised while handling ``cause``, as MLflow wraps its HTTP client's."""
    try:
        raise cause
    except BaseException:
        try:
            raise RuntimeError("API request to http://mlflow:5000 failed") from None
        except RuntimeError as outer:
            outer.__context__ = cause
            return outer


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InputNotFound("no input"), ExitCode.BAD_INPUT),
        (MissingColumn("no column"), ExitCode.BAD_INPUT),
        (InvalidName("bad name"), ExitCode.BAD_INPUT),
        (SettingsError("bad setting"), ExitCode.BAD_INPUT),
        (BadStoreUrl("bad url"), ExitCode.BAD_INPUT),
        (NamespaceNotFound("no namespace"), ExitCode.BAD_INPUT),
        (VersionNotFound("no version"), ExitCode.BAD_INPUT),
        (ModelNotFound("no model"), ExitCode.BAD_INPUT),
        (RegistryError("not a model folder"), ExitCode.BAD_INPUT),
        (UnsupportedModel("tensor signature without --features"), ExitCode.BAD_INPUT),
        (QualityConfigError("bad quality config"), ExitCode.BAD_INPUT),
        (RunError("no plan"), ExitCode.BAD_INPUT),
        (TooManyNulls("nulls"), ExitCode.GATE),
        (ValidationFailed("expectation broken", failures=[]), ExitCode.GATE),
        (DriftDetected("drifted", drift=[]), ExitCode.GATE),
        (StoreUnavailable("redis down"), ExitCode.UNAVAILABLE),
        (StoreAuthFailed("wrong password"), ExitCode.UNAVAILABLE),
        (ShardFailed("shard 3"), ExitCode.FAILED),
        (DemoFailed("demo check"), ExitCode.FAILED),
        (BatchscoreError("other"), ExitCode.FAILED),
        (ValueError("a bug"), ExitCode.FAILED),
        (FileNotFoundError("a bug too"), ExitCode.FAILED),
        (ConnectionRefusedError("refused"), ExitCode.UNAVAILABLE),
        (OSError("Timed out trying to connect to tcp://10.0.0.1:8786 after 30 s"), 5),
        (wrapped(requests.exceptions.ConnectionError("refused")), ExitCode.UNAVAILABLE),
        (wrapped(ValueError("bad JSON")), ExitCode.FAILED),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_exit_code_by_kind(error: BaseException, code: int) -> None:
    assert exit_code(error) == code


def test_a_job_config_error_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "dags"))
    from batchscore_dags.errors import JobConfigError

    assert exit_code(JobConfigError("bad job YAML")) == ExitCode.BAD_INPUT
