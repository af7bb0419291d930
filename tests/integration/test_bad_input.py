"""Bad input fails before anything is published, naming the thing and what was expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.core.errors import BatchscoreError
from batchscore.core.settings import RunSettings, load_settings
from batchscore.samples import feature_names
from jobs import steps
from jobs.pipeline import run_pipeline
from kv_export.store import open_store
from registry.errors import ModelNotFound
from scoring.errors import (
    BadColumnType,
    BadKeyColumn,
    CorruptInput,
    InputNotFound,
    MissingColumn,
    ValidationFailed,
)
from tests.conftest import KEY, N_FEATURES


def write(folder: Path, name: str = "part-0.parquet", rows: int = 200, **changes: object) -> Path:
    rng = np.random.default_rng(0)
    columns: dict[str, object] = {KEY: np.arange(rows, dtype=np.int64)}
    columns |= {f: rng.standard_normal(rows).astype(np.float32) for f in feature_names(N_FEATURES)}
    for column, value in changes.items():
        if value is None:
            columns.pop(column)
        else:
            columns[column] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pq.write_table(pa.table(columns), path, row_group_size=50)
    return path


def attempt(input_path: Path, model: str = "models:/churn@champion") -> BatchscoreError:
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings, input_path=str(input_path), model_uri=model, key_column=KEY, namespace="bad"
    )
    with pytest.raises(BatchscoreError) as caught:
        run_pipeline(settings, params)
    assert open_store(settings.resolved_store_url).state("bad").versions == {}, "nothing stored"
    return caught.value


def test_missing_input_path(env: dict[str, str], tmp_path: Path) -> None:
    error = attempt(tmp_path / "nowhere")
    assert isinstance(error, InputNotFound) and str(tmp_path / "nowhere") in str(error)


def test_empty_input_folder(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    error = attempt(tmp_path / "empty")
    assert isinstance(error, InputNotFound) and "holds no Parquet files" in str(error)


def test_missing_feature_column(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "in", "a.parquet")
    path = write(tmp_path / "in", "b.parquet", f03=None)
    error = attempt(tmp_path / "in")
    assert isinstance(error, MissingColumn)
    assert "'f03'" in str(error) and str(path) in str(error) and "signature" in str(error)


def test_feature_column_of_strings(env: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path / "in", f02=np.array(["x"] * 200))
    error = attempt(tmp_path / "in")
    assert isinstance(error, BadColumnType)
    assert "'f02' has type string" in str(error) and str(path) in str(error)
    assert "numeric" in str(error)


def test_corrupt_parquet_file(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "in")
    broken = tmp_path / "in" / "part-1.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    error = attempt(tmp_path / "in")
    assert isinstance(error, CorruptInput) and str(broken) in str(error)


def test_missing_key_column(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "in", **{KEY: None})
    error = attempt(tmp_path / "in")
    assert isinstance(error, BadKeyColumn) and f"'{KEY}' is missing" in str(error)


def test_null_keys(env: dict[str, str], tmp_path: Path) -> None:
    keys = pa.array([None if i == 7 else i for i in range(200)], pa.int64())
    write(tmp_path / "in", **{KEY: keys})
    error = attempt(tmp_path / "in")
    assert isinstance(error, BadKeyColumn) and "null" in str(error) and f"'{KEY}'" in str(error)


@pytest.mark.slow
def test_duplicate_keys(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "in", "a.parquet")
    write(tmp_path / "in", "b.parquet")  # the same keys again, in another file
    error = attempt(tmp_path / "in")
    assert isinstance(error, ValidationFailed)
    assert f"expect_column_values_to_be_unique on column '{KEY}'" in str(error)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("models:/nosuchmodel@champion", "Registered model 'nosuchmodel' does not exist"),
        ("models:/churn/99", "has no version 99"),
        ("models:/churn@nosuchalias", "has no alias 'nosuchalias'"),
        ("s3://bucket/model", "is not a registry URI"),
    ],
)
def test_unknown_model(env: dict[str, str], tmp_path: Path, model: str, expected: str) -> None:
    write(tmp_path / "in")
    error = attempt(tmp_path / "in", model)
    assert isinstance(error, ModelNotFound) and expected in str(error)


def test_pickled_model_is_refused_when_mlflow_forbids_pickles(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    write(tmp_path / "in")
    error = attempt(tmp_path / "in")
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true" in str(error)
