"""How predictions become bytes in a KV store: one pure, versioned function each way.

Encoding version 2 (``ENCODING``; every ``VersionInfo`` records the encoding it
was written with, and readers follow the recorded one):

- A key is the text form of the input's key column (``str(12345)`` for an
  integer key), UTF-8 encoded. The API receives keys as text, so text is the
  common form. ``text_keys`` is the same function over a whole Arrow column.
- A value is the row's outputs as little-endian float32, packed in the order of
  the version's ``outputs`` list: 4 bytes per output, nothing else. Model name,
  version, run id and scored_at are stored once per version, not per key.
- In Redis a version's keys are spread over ``buckets`` hashes, about
  ``KEYS_PER_BUCKET`` keys each (bucket = crc32(key) mod buckets), small
  enough for Redis's compact listpack encoding. Version 2 names a bucket
  ``bs:{<namespace>:v<version>:g<group>}:b<bucket>`` with group = bucket //
  ``BUCKETS_PER_GROUP``: the braces are a Redis Cluster hash tag, so the
  buckets of one group share a slot and one multi-key UNLINK (or EXPIRE
  pipeline) per group is legal on a cluster, while the groups of a version
  spread over all slots. Version 1 named it ``bs:<namespace>:v<version>:b<bucket>``.
- The namespace state is ``bs:{<namespace>}:state`` (one key, one slot).
- In LMDB a key is ``<namespace> NUL <version as 4 bytes big-endian> <key>``,
  so one version is one contiguous key range.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ENCODING = 2
VALUE_DTYPE = np.dtype("<f4")
KEYS_PER_BUCKET = 64
BUCKETS_PER_GROUP = 1024


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


CANARY_SLOTS = 10_000  # a canary's share is a number of these slots (0.01 % each)


def canary_slot(key: bytes) -> int:
    """The key's slot in [0, ``CANARY_SLOTS``): a canary at P % answers the keys whose slot
    is below P × 100. The same in every process and release (zlib's CRC-32 of the stored
    key bytes, never Python's salted ``hash``), so a key keeps its version across API
    workers, the batch fallback and the drift check; the slot is the CRC's high bits
    scaled to the range (a multiply and a shift), so it is independent of the Redis
    bucket (the CRC modulo the bucket count), and raising the share only adds keys."""
    return (zlib.crc32(key) * CANARY_SLOTS) >> 32


def bucket_count(expected_keys: int) -> int:
    return max(1, -(-expected_keys // KEYS_PER_BUCKET))


def bucket_of(key: bytes, buckets: int) -> int:
    return zlib.crc32(key) % buckets


def redis_bucket_key(namespace: str, version: int, bucket: int, encoding: int = ENCODING) -> bytes:
    """The hash holding ``bucket`` of a version, in the layout of ``encoding``."""
    if encoding == 1:
        return f"bs:{namespace}:v{version}:b{bucket}".encode()
    group = bucket // BUCKETS_PER_GROUP
    return f"bs:{{{namespace}:v{version}:g{group}}}:b{bucket}".encode()


def redis_bucket_groups(
    namespace: str, version: int, buckets: int, encoding: int = ENCODING
) -> list[list[bytes]]:
    """Every bucket key of a version, in groups that each lie in one Cluster slot.

    Invariant: in encoding 2 all keys of one group share a hash tag, so a
    multi-key command over one group never spans slots. Encoding 1 had no
    tags; its groups are merely batches (single-server only).
    """
    return [
        [
            redis_bucket_key(namespace, version, b, encoding)
            for b in range(start, min(start + BUCKETS_PER_GROUP, buckets))
        ]
        for start in range(0, buckets, BUCKETS_PER_GROUP)
    ]


def redis_state_key(namespace: str) -> bytes:
    # The braces make a Redis Cluster hash tag: a namespace's state is one key, one slot.
    return f"bs:{{{namespace}}}:state".encode()


def lmdb_version_prefix(namespace: str, version: int) -> bytes:
    return namespace.encode("utf-8") + b"\x00" + version.to_bytes(4, "big")


def lmdb_key(namespace: str, version: int, key: bytes) -> bytes:
    return lmdb_version_prefix(namespace, version) + key


def text_keys(column: pa.Array | pa.ChunkedArray) -> pa.BinaryArray:
    """``encode_keys`` over a whole Arrow column: the UTF-8 text form of each key."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_string(column.type) or pa.types.is_binary(column.type)):
        column = pc.cast(column, pa.string())
    return column.cast(pa.binary())


def crc32_many(keys: pa.BinaryArray) -> np.ndarray:
    """``zlib.crc32`` of every key (uint32), vectorised over the key bytes.

    Table-driven CRC-32 (the zlib/PNG polynomial), one numpy pass per byte
    position, so a bulk load assigns buckets exactly as ``bucket_of`` does for
    one key, without a Python call per key.
    """
    offsets, data = _binary_buffers(keys)
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    crc = np.full(len(starts), 0xFFFFFFFF, dtype=np.uint32)
    for position in range(int(lengths.max()) if len(lengths) else 0):
        rows = None if lengths.min() > position else np.flatnonzero(lengths > position)
        current = crc if rows is None else crc[rows]
        byte = data[(starts if rows is None else starts[rows]) + position]
        updated = _CRC_TABLE[(current ^ byte) & 0xFF] ^ (current >> 8)
        if rows is None:
            crc = updated
        else:
            crc[rows] = updated
    return crc ^ np.uint32(0xFFFFFFFF)


def _binary_buffers(keys: pa.BinaryArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets as int64, data as uint8) of a binary array, without copying the data."""
    _, offsets_buf, data_buf = keys.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[keys.offset : keys.offset + len(keys) + 1]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    return offsets.astype(np.int64), data


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table.astype(np.uint32)


_CRC_TABLE = _crc_table()


def redis_hset_payload(
    namespace: str,
    version: int,
    buckets: int,
    keys: pa.BinaryArray,
    values: np.ndarray,
    *,
    chunk_commands: int = 4096,
    split_groups: bool = False,
) -> list[tuple[memoryview, int]]:
    """The raw RESP bytes of the HSETs that load ``keys`` → ``values`` into their buckets.

    Pure: returns ``(payload, commands)`` chunks, one multi-field ``HSET`` per
    bucket touched and at most ``chunk_commands`` commands a chunk; the bytes
    are exactly what redis-py sends for ``HSET <bucket key> k1 v1 k2 v2 ...``,
    built with Arrow and numpy instead of per key in Python: headers and
    fields are interleaved by one Arrow ``take``. ``values`` is (rows, outputs).
    With ``split_groups`` a chunk also ends where a bucket group ends, so every chunk
    lies in one Redis Cluster slot (``redis_bucket_groups``) and goes to one node.
    """
    n = len(keys)
    if n == 0:
        return []
    matrix = np.ascontiguousarray(values, dtype=VALUE_DTYPE).reshape(n, -1)
    width = matrix.shape[1] * VALUE_DTYPE.itemsize
    bucket = crc32_many(keys) % np.uint32(buckets)
    order = np.argsort(bucket, kind="stable")
    sorted_buckets = bucket[order]
    first = np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]]
    starts = np.flatnonzero(first)
    touched = len(starts)
    counts = np.diff(np.r_[starts, n])
    headers = _hset_headers(namespace, version, sorted_buckets[starts], counts)
    # Output slot of bucket j's header: starts[j] + j; of the r-th field in sorted order:
    # r + (its bucket's rank + 1). Slots < touched in ``combined`` are headers.
    index = np.empty(n + touched, dtype=np.int64)
    index[starts + np.arange(touched)] = np.arange(touched)
    index[np.arange(n) + np.cumsum(first)] = touched + order
    fields = _field_records(keys, matrix, width)
    combined = pa.concat_arrays([headers, fields]).take(pa.array(index))
    offsets, data = _binary_buffers(combined)
    raw = data.data  # a memoryview of the payload, no copy
    header_slots = starts + np.arange(touched)
    rank = np.arange(touched)
    if split_groups:  # the rank of each bucket within its group, a chunk every chunk_commands
        groups = sorted_buckets[starts] // BUCKETS_PER_GROUP
        opens = np.r_[True, groups[1:] != groups[:-1]]
        rank = rank - np.maximum.accumulate(np.where(opens, rank, 0))
    firsts = np.flatnonzero(rank % chunk_commands == 0)
    bounds = np.r_[offsets[header_slots[firsts]], offsets[-1]]
    sizes = np.diff(np.r_[firsts, touched])
    return [(raw[int(bounds[i]) : int(bounds[i + 1])], int(sizes[i])) for i in range(len(sizes))]


def _hset_headers(
    namespace: str, version: int, buckets: np.ndarray, counts: np.ndarray
) -> pa.BinaryArray:
    """``*<2+2 fields>\\r\\n$4\\r\\nHSET\\r\\n$<len>\\r\\n<bucket key>\\r\\n`` per bucket."""

    def text(numbers: np.ndarray) -> pa.Array:
        return pc.cast(pa.array(numbers), pa.string()).cast(pa.binary())

    groups = buckets // BUCKETS_PER_GROUP
    names = pc.binary_join_element_wise(
        f"bs:{{{namespace}:v{version}:g".encode(), text(groups), b"}:b", text(buckets), b""
    )
    return pc.binary_join_element_wise(
        b"*",
        text(2 + 2 * counts),
        b"\r\n$4\r\nHSET\r\n$",
        text(pc.binary_length(names).to_numpy()),
        b"\r\n",
        names,
        b"\r\n",
        b"",
    )


def _field_records(keys: pa.BinaryArray, matrix: np.ndarray, width: int) -> pa.BinaryArray:
    """``$<len>\\r\\n<key>\\r\\n$<width>\\r\\n<value>\\r\\n`` per row: one field of an HSET."""
    lengths = pc.cast(pc.binary_length(keys), pa.string()).cast(pa.binary())
    value_column = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(keys), [None, pa.py_buffer(matrix.tobytes())]
    ).cast(pa.binary())
    return pc.binary_join_element_wise(
        b"$", lengths, b"\r\n", keys, b"\r\n$%d\r\n" % width, value_column, b"\r\n", b""
    )
