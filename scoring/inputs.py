"""Find and check the Parquet input before anything is scored.

Every check reads only Parquet footers (schema, row-group sizes, statistics),
so bad input fails in seconds with an error naming the file and column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
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
    TooManyNulls,
)
from scoring.quality import (
    always_castable,
    null_rate,
    range_limit,
    target_dtype,
    within_limit,
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


def inspect_input(
    input_path: str | Path,
    features: Sequence[str],
    key_column: str,
    *,
    feature_types: Mapping[str, str] | None = None,
    max_null_rate: float = 0.0,
) -> InputSummary:
    """Check every file's footer: key, feature columns, their types, null rates, ranges."""
    files = discover(input_path)
    described: list[InputFile] = []
    key_types: set[str] = set()
    digest = hashlib.sha256()
    for path in files:
        meta = _read_footer(path)
        schema = meta.schema.to_arrow_schema()
        key_types.add(_check_key(path, schema, meta, key_column))
        _check_features(path, schema, features)
        _check_nulls(path, schema, meta, features, max_null_rate)
        _check_castable(path, schema, meta, features, feature_types or {})
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


def _column_stats(meta: pq.FileMetaData, column: int) -> list[pq.Statistics | None]:
    return [meta.row_group(i).column(column).statistics for i in range(meta.num_row_groups)]


def _check_nulls(
    path: Path, schema: pa.Schema, meta: pq.FileMetaData, features: Sequence[str], bound: float
) -> None:
    """Null counts come from row-group statistics; a missing count is read as unknown (0)."""
    for name in features:
        stats = _column_stats(meta, schema.names.index(name))
        nulls = sum(s.null_count for s in stats if s is not None and s.has_null_count)
        rate = null_rate(nulls, meta.num_rows)
        if rate > bound:
            raise TooManyNulls(
                f"Input column '{name}' is {rate:.2%} null ({nulls} of {meta.num_rows} rows) "
                f"in {path}",
                expected=f"a null rate of at most {bound:.2%} (BATCHSCORE_MAX_FEATURE_NULL_RATE)",
                fix="Fill the nulls upstream, or raise the bound if the model handles NaN",
            )


def _check_castable(
    path: Path,
    schema: pa.Schema,
    meta: pq.FileMetaData,
    features: Sequence[str],
    feature_types: Mapping[str, str],
) -> None:
    """Refuse a column whose values the model's dtype cannot hold exactly (see scoring.quality)."""
    for name in features:
        kind, target = schema.field(name).type, target_dtype(feature_types.get(name))
        if always_castable(kind, target):
            continue
        limit = range_limit(kind, target)
        if limit is None:
            continue  # non-numeric columns were refused by _check_features
        low, high = _range(_column_stats(meta, schema.names.index(name)))
        if not within_limit(low, high, limit):
            raise BadColumnType(
                f"Input column '{name}' has type {kind} in {path}, with values that {target} "
                "cannot hold exactly",
                expected=f"values within ±{limit:.6g} (the model takes {target})",
                found=f"min {low}, max {high}" if low is not None else "no min/max statistics",
                fix=f"Cast the column to {target} upstream (accepting the rounding), "
                "or write Parquet statistics",
            )


def _range(stats: list[pq.Statistics | None]) -> tuple[float | None, float | None]:
    """The column's min and max over row groups; (None, None) when any group lacks them."""
    lows, highs = [], []
    for s in stats:
        if s is None or not s.has_min_max:
            if s is not None and s.num_values == 0:
                continue  # an all-null row group holds no value to cast
            return None, None
        lows.append(float(s.min))
        highs.append(float(s.max))
    return (min(lows), max(highs)) if lows else (0.0, 0.0)
