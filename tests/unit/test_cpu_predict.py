"""The CPU path gathers each batch from the Arrow columns into reused buffers
(``scoring.core.score_gathered`` / ``gather_rows``): the predictions must be the
forward pass over the whole feature matrix, row for row, whatever the table's chunks,
nulls, column types and size against the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from scoring.core import gather_rows, score_batch, score_gathered
from scoring.errors import UnsupportedModel
from scoring.model import Predictor, feature_matrix
from scoring.reference import MLP
from scoring.spec import read_model_spec

FEATURES = ("a", "b", "c")


def odd_table(rows: int) -> pa.Table:
    """Three chunks; a float64 column with nulls, an int64 column, a float32 one."""
    rng = np.random.default_rng(3)
    chunks = []
    for size in (rows // 3, rows // 3, rows - 2 * (rows // 3)):
        b = rng.standard_normal(size)
        chunks.append(
            pa.table(
                {
                    "key": pa.array(rng.integers(0, 1 << 40, size), pa.int64()),
                    "c": pa.array(rng.standard_normal(size).astype(np.float32)),
                    "b": pa.array(b, mask=rng.random(size) < 0.1),
                    "a": pa.array(rng.integers(-50, 50, size), pa.int64()),
                }
            )
        )
    return pa.concat_tables(chunks)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "mlp"
    mlflow.pytorch.save_model(
        MLP(len(FEATURES), hidden=(16,), n_outputs=2, sigmoid=False).eval(),
        str(path),
        signature=ModelSignature(
            inputs=Schema([ColSpec("float", n) for n in FEATURES]),
            outputs=Schema([ColSpec("float", "p"), ColSpec("float", "q")]),
        ),
        serialization_format="pickle",
        pip_requirements=["torch"],
    )
    return path


@pytest.mark.parametrize(("rows", "batch"), [(1001, 64), (1001, 1001), (1001, 5000), (7, 3)])
def test_predictions_are_the_forward_pass_over_the_whole_matrix(
    saved_model: Path, rows: int, batch: int
) -> None:
    table = odd_table(rows)
    predictor = Predictor(saved_model, read_model_spec(saved_model, FEATURES))
    got = predictor.predict(table, batch)
    with torch.inference_mode():
        expected = predictor._torch(torch.from_numpy(feature_matrix(table, FEATURES))).numpy()
    assert got.shape == (rows, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # a second table through the same (now reused) buffers
    again = predictor.predict(table.slice(5), batch)
    np.testing.assert_allclose(again, expected[5:], rtol=1e-5, atol=1e-6)


def test_the_worker_is_called_before_each_forward_pass(saved_model: Path) -> None:
    """Where the worker sets the thread's share of its cores (ModelPlugin.share_cores)."""
    predictor = Predictor(saved_model, read_model_spec(saved_model, FEATURES))
    calls: list[int] = []
    got = predictor.predict(odd_table(1001), 64, lambda: calls.append(1))
    assert len(calls) == 16  # ceil(1001 / 64)
    np.testing.assert_array_equal(got, predictor.predict(odd_table(1001), 64))


def test_an_empty_table_gives_no_rows(saved_model: Path) -> None:
    predictor = Predictor(saved_model, read_model_spec(saved_model, FEATURES))
    assert predictor.predict(odd_table(0), 64).shape == (0, 2)


def test_a_model_that_returns_its_input_is_copied_out_of_the_reused_buffer() -> None:
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    columns = [rows[:, j].copy() for j in range(3)]
    out, scratch = np.empty((4, 3), np.float32), np.empty((3, 4), np.float32)
    got = score_gathered(
        lambda batch: batch,  # a view of ``out``, overwritten by the next batch
        lambda start, stop: gather_rows(columns, start, stop, out, scratch),
        10,
        4,
    )
    np.testing.assert_array_equal(got, rows)


def test_a_model_that_returns_too_few_rows_is_refused() -> None:
    model = MLP(3, hidden=(4,)).eval()
    features = np.ones((10, 3), np.float32)
    with pytest.raises(UnsupportedModel, match="returned 1 predictions for a batch of 4 rows"):
        score_gathered(
            lambda batch: score_batch(model, batch[:1]), lambda s, e: features[s:e], 10, 4
        )
