"""How predictions become bytes in a KV store: one pure, versioned function each way.

Encoding version 1 (``ENCODING``):

- A key is the text form of the input's key column (``str(12345)`` for an
  integer key), UTF-8 encoded. The API receives keys as text, so text is the
  common form.
- A value is the row's outputs as little-endian float32, packed in the order of
  the version's ``outputs`` list: 4 bytes per output, nothing else. Model name,
  version, run id and scored_at are stored once per version, not per key.
- In Redis a version's keys are spread over ``buckets`` hashes named
  ``bs:<namespace>:v<version>:b<bucket>`` (bucket = crc32(key) mod buckets),
  about ``KEYS_PER_BUCKET`` keys each, small enough for Redis's compact
  listpack encoding; a version is deleted with one UNLINK per bucket, no SCAN.
- In LMDB a key is ``<namespace> NUL <version as 4 bytes big-endian> <key>``,
  so one version is one contiguous key range.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np

ENCODING = 1
VALUE_DTYPE = np.dtype("<f4")
KEYS_PER_BUCKET = 64


def encode_keys(keys: Iterable[object]) -> list[bytes]:
    return [str(k).encode("utf-8") for k in keys]


def pack_values(outputs: np.ndarray) -> list[bytes]:
    """(rows, n_outputs) -> one bytes value per row."""
    matrix = np.ascontiguousarray(outputs, dtype=VALUE_DTYPE)
    if matrix.ndim == 1:
        matrix = matrix.reshape(-1, 1)
    width = matrix.shape[1] * VALUE_DTYPE.itemsize
    blob = matrix.tobytes()
    return [blob[i : i + width] for i in range(0, len(blob), width)]


def unpack_value(value: bytes, outputs: Sequence[str]) -> dict[str, float]:
    numbers = np.frombuffer(value, dtype=VALUE_DTYPE)
    if len(numbers) != len(outputs):
        raise ValueError(
            f"value holds {len(numbers)} numbers but the version has outputs {list(outputs)}"
        )
    return {name: float(x) for name, x in zip(outputs, numbers, strict=True)}


def bucket_count(expected_keys: int) -> int:
    return max(1, -(-expected_keys // KEYS_PER_BUCKET))


def bucket_of(key: bytes, buckets: int) -> int:
    return zlib.crc32(key) % buckets


def redis_bucket_key(namespace: str, version: int, bucket: int) -> bytes:
    return f"bs:{namespace}:v{version}:b{bucket}".encode()


def redis_state_key(namespace: str) -> bytes:
    # The braces make a Redis Cluster hash tag: a namespace's state is one key, one slot.
    return f"bs:{{{namespace}}}:state".encode()


def lmdb_version_prefix(namespace: str, version: int) -> bytes:
    return namespace.encode("utf-8") + b"\x00" + version.to_bytes(4, "big")


def lmdb_key(namespace: str, version: int, key: bytes) -> bytes:
    return lmdb_version_prefix(namespace, version) + key
