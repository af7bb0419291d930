from __future__ import annotations

from pathlib import Path

import pytest

from batchscore.core.errors import SettingsError
from batchscore.core.settings import ApiSettings, RunSettings, load_settings


def test_defaults_put_everything_under_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BATCHSCORE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_settings(RunSettings)
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert settings.resolved_store_url == f"lmdb://{tmp_path / 'store'}"
    assert settings.runs_dir == tmp_path / "runs"


def test_mlflow_tracking_uri_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert load_settings(RunSettings).tracking_uri == "http://mlflow:5000"


def test_unknown_batchscore_variable_is_rejected_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHSCORE_STOER_URL", "redis://x")
    with pytest.raises(SettingsError, match="BATCHSCORE_STOER_URL"):
        load_settings(ApiSettings)


def test_a_bad_value_names_the_variable_and_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHSCORE_WORKERS", "many")
    with pytest.raises(SettingsError, match=r"BATCHSCORE_WORKERS='many'.*integer"):
        load_settings(RunSettings)


def test_cluster_must_be_local_or_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHSCORE_CLUSTER", "somewhere")
    with pytest.raises(SettingsError, match="BATCHSCORE_CLUSTER='somewhere'.*tcp://"):
        load_settings(RunSettings)
    monkeypatch.setenv("BATCHSCORE_CLUSTER", "tcp://10.0.0.1:8786")
    assert load_settings(RunSettings).cluster == "tcp://10.0.0.1:8786"


def test_command_line_values_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHSCORE_PORT", "9000")
    assert load_settings(ApiSettings, port=9100).port == 9100
    assert load_settings(ApiSettings, port=None).port == 9000
