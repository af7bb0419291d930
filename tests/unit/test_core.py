from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from scoring.core import as_matrix, score_batch, score_in_batches
from scoring.model import feature_matrix
from scoring.reference import MLP


def test_score_batch_on_a_three_row_frame_equals_the_forward_pass() -> None:
    torch.manual_seed(0)
    model = MLP(4, hidden=(8,), n_outputs=2, sigmoid=False).eval()
    rows = np.array([[0, 1, 2, 3], [1, 1, 1, 1], [-1, 0, 0.5, 2]], dtype=np.float32)
    expected = model(torch.from_numpy(rows)).detach().numpy()
    got = score_batch(model, rows)
    assert got.dtype == np.float32 and got.shape == (3, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_batches_give_the_same_predictions_in_the_same_order() -> None:
    model = MLP(3, hidden=(5,)).eval()
    rows = np.random.default_rng(0).standard_normal((101, 3)).astype(np.float32)
    whole = score_batch(model, rows)
    batched = score_in_batches(lambda x: score_batch(model, x), rows, 7)
    np.testing.assert_allclose(batched, whole, rtol=1e-5)


def test_as_matrix_accepts_vectors_tuples_and_frames() -> None:
    assert as_matrix(torch.ones(3)).shape == (3, 1)
    assert as_matrix((torch.ones(3, 1), torch.zeros(3, 2))).shape == (3, 3)
    assert as_matrix(np.ones((2, 2), dtype=np.float64)).dtype == np.float32


def test_feature_matrix_orders_by_name_and_makes_nulls_nan() -> None:
    table = pa.table({"b": pa.array([1.0, None]), "a": pa.array([3, 4], pa.int64())})
    matrix = feature_matrix(table, ("a", "b"))
    assert matrix.flags.c_contiguous and matrix.flags.writeable
    np.testing.assert_array_equal(matrix[:, 0], [3, 4])
    assert matrix[0, 1] == 1.0 and np.isnan(matrix[1, 1])
