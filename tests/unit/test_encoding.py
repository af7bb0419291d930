from __future__ import annotations

import numpy as np
import pytest

from kv_export.encoding import (
    bucket_count,
    bucket_of,
    encode_keys,
    lmdb_key,
    lmdb_version_prefix,
    pack_values,
    unpack_value,
)


def test_keys_are_their_text_form() -> None:
    assert encode_keys([12345, "abc", "é"]) == [b"12345", b"abc", "é".encode()]


def test_values_round_trip_as_little_endian_float32() -> None:
    matrix = np.array([[0.25, -1.5], [3.0, 1e-3]], dtype=np.float32)
    packed = pack_values(matrix)
    assert packed[0] == np.array([0.25, -1.5], dtype="<f4").tobytes()
    assert [len(v) for v in packed] == [8, 8]
    assert unpack_value(packed[1], ["a", "b"]) == pytest.approx({"a": 3.0, "b": 1e-3})


def test_one_dimensional_outputs_pack_one_number_per_row() -> None:
    assert [len(v) for v in pack_values(np.arange(3, dtype=np.float64))] == [4, 4, 4]


def test_unpack_refuses_a_value_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="outputs"):
        unpack_value(b"\x00" * 8, ["only_one"])


def test_buckets_are_stable_and_sized_for_listpacks() -> None:
    assert bucket_count(0) == 1 and bucket_count(64) == 1 and bucket_count(65) == 2
    assert bucket_of(b"12345", 1000) == bucket_of(b"12345", 1000)
    spread = {bucket_of(str(k).encode(), 16) for k in range(1000)}
    assert spread == set(range(16))


def test_lmdb_keys_of_one_version_share_a_prefix() -> None:
    prefix = lmdb_version_prefix("churn", 7)
    assert lmdb_key("churn", 7, b"42").startswith(prefix)
    assert not lmdb_key("churn", 8, b"42").startswith(prefix)
    assert not lmdb_key("churn2", 7, b"42").startswith(prefix)
