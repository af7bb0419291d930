"""Find and check the Parquet input before anything is scored.

Every check reads only Parquet footers (schema, row-group sizes, statistics),
so bad input fails in seconds with an error naming the file and column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from scoring.errors import (
    BadColumnType,
    BadKeyColumn,
    CorruptInput,
    InputNotFound,
    MissingColumn,
)
from scoring.shards import InputFile


@dataclass(frozen=True)
class InputSummary:
    root: str
    files: tuple[InputFile, ...]
    rows: int
    fingerprint: str
    key_type: Literal["int", "string"]


def discover(input_path: str | Path) -> list[Path]:
    """A Parquet file, or every ``*.parquet`` under a folder (partition folders included)."""
    root = Path(input_path).expanduser()
    if not root.exists():
        raise InputNotFound(
            f"Input path {root} does not exist",
            expected="a Parquet file or a folder of Parquet files",
        )
    if root.is_file():
        return [root.absolute()]
    files = sorted(
        p.absolute()
        for p in root.rglob("*.parquet")
        if p.is_file()
        and not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts)
    )
    if not files:
        raise InputNotFound(
            f"Input folder {root} holds no Parquet files",
            expected="files named *.parquet, directly or in partition folders (dt=2026-11-20/)",
        )
    return files


def inspect_input(input_path: str | Path, features: Sequence[str], key_column: str) -> InputSummary:
    files = discover(input_path)
    described: list[InputFile] = []
    key_types: set[str] = set()
    digest = hashlib.sha256()
    for path in files:
        meta = _read_footer(path)
        schema = meta.schema.to_arrow_schema()
        key_types.add(_check_key(path, schema, meta, key_column))
        _check_features(path, schema, features)
        sizes = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        described.append(InputFile(str(path), sizes))
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{meta.num_rows}\n".encode())
    if len(key_types) > 1:
        raise BadKeyColumn(
            f"Key column '{key_column}' has different types across the input files",
            expected="one type (integer or string) in every file",
            found=", ".join(sorted(key_types)),
        )
    rows = sum(f.rows for f in described)
    if rows == 0:
        raise InputNotFound(f"Input {input_path} has no rows", expected="at least one row")
    key_type: Literal["int", "string"] = "int" if key_types == {"int"} else "string"
    return InputSummary(str(input_path), tuple(described), rows, digest.hexdigest(), key_type)


def _read_footer(path: Path) -> pq.FileMetaData:
    try:
        return pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise CorruptInput(
            f"Input file {path} is not a readable Parquet file",
            found=str(exc),
            fix="Rewrite or remove the file",
        ) from exc


def _check_key(path: Path, schema: pa.Schema, meta: pq.FileMetaData, key: str) -> str:
    if key not in schema.names:
        raise BadKeyColumn(
            f"Key column '{key}' is missing in {path}",
            expected=f"a column named '{key}'",
            found=f"columns {schema.names}",
            fix="Pass the right --key-column",
        )
    kind = schema.field(key).type
    if pa.types.is_integer(kind):
        key_type = "int"
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        key_type = "string"
    else:
        raise BadKeyColumn(
            f"Key column '{key}' has type {kind} in {path}",
            expected="an integer or string key column",
        )
    column = schema.names.index(key)
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is not None and stats.has_null_count and stats.null_count > 0:
            raise BadKeyColumn(
                f"Key column '{key}' has {stats.null_count} null values in {path} (row group {i})",
                expected="a key for every row",
            )
    return key_type


def _check_features(path: Path, schema: pa.Schema, features: Sequence[str]) -> None:
    missing = [f for f in features if f not in schema.names]
    if missing:
        raise MissingColumn(
            f"Input column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} missing in {path}",
            expected="every feature column of the model signature",
            found=f"columns {schema.names}",
        )
    for name in features:
        kind = schema.field(name).type
        if not (
            pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
        ):
            raise BadColumnType(
                f"Input column '{name}' has type {kind} in {path}",
                expected="a numeric column (float32, as the model takes)",
                fix="Cast the column to a number upstream, or drop it from the signature",
            )
