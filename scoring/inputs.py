"""Find and check the Parquet input before anything is scored.

Every check reads only Parquet footers (schema, row-group sizes, statistics),
so bad input fails in seconds with an error naming the file and column. The input is a
local file or folder, or an object-store URL (``s3://bucket/prefix/``, ``gs://``,
``abfs://``; ``batchscore.core.storage``): one listing finds the objects, and each
footer is one ranged read of its object's tail; nothing is copied to local disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.core import storage
from scoring.errors import (
    BadColumnType,
    BadKeyColumn,
    CorruptInput,
    InputAccessDenied,
    InputError,
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

if TYPE_CHECKING:
    import pyarrow.fs as pafs

FOOTER_THREADS = 8  # footers fetched at once from an object store (each a round trip)


@dataclass(frozen=True)
class InputSummary:
    root: str
    files: tuple[InputFile, ...]
    rows: int
    fingerprint: str
    key_type: Literal["int", "string"]


@dataclass(frozen=True)
class InputObject:
    """One input file as listed: a local path or an object URL, its size and mtime."""

    path: str
    size: int
    mtime_ns: int

    @property
    def token(self) -> str:
        """What identifies this version of the file (the run id and fingerprint use it)."""
        return f"{self.path}:{self.size}:{self.mtime_ns}"


def discover(input_path: str | Path) -> list[InputObject]:
    """A Parquet file, or every ``*.parquet`` under a folder or object-store prefix
    (partition folders included; names starting with ``_`` or ``.`` skipped)."""
    if storage.is_remote(input_path):
        return _discover_remote(str(input_path))
    root = Path(input_path).expanduser()
    if not root.exists():
        raise InputNotFound(
            f"Input path {root} does not exist",
            expected="a Parquet file or a folder of Parquet files",
        )
    if root.is_file():
        return [_local_object(root.absolute())]
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
    return [_local_object(p) for p in files]


def _local_object(path: Path) -> InputObject:
    stat = path.stat()
    return InputObject(str(path), stat.st_size, stat.st_mtime_ns)


def _discover_remote(url: str) -> list[InputObject]:
    """One listing of the prefix (or one look at the object): no object is read here."""
    import pyarrow.fs as pafs

    if storage.carries_secret(url):
        raise InputAccessDenied(
            f"Input URL {storage.public(url)} carries credentials",
            expected="a URL without a key or password",
            fix="Give credentials as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
            "the SDK's other places (for S3); they would be written to the run's manifest",
        )
    base = url.rstrip("/")
    try:
        filesystem, path = storage.resolve(url)
        single = filesystem.get_file_info(path) if not url.endswith("/") else None
        if single is not None and single.type == pafs.FileType.File:
            return [_remote_object(base, single, path)]
        listed = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    except (OSError, ValueError) as exc:
        raise input_failure(url, exc, "list") from None
    found = [
        _remote_object(base, info, path)
        for info in listed
        if info.type == pafs.FileType.File
        and info.path.endswith(".parquet")
        and not any(part.startswith(("_", ".")) for part in _relative(info.path, path).split("/"))
    ]
    if not found:
        raise InputNotFound(
            f"Input prefix {storage.public(url)} holds no Parquet objects",
            expected="objects named *.parquet under the prefix, directly or in partition "
            "folders (dt=2026-11-20/)",
            found=f"{sum(1 for i in listed if i.type == pafs.FileType.File)} other objects",
        )
    return sorted(found, key=lambda o: o.path)


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") if path.startswith(root) else path


def _remote_object(base: str, info: pafs.FileInfo, root: str) -> InputObject:
    relative = _relative(info.path, root)
    url = f"{base}/{relative}" if relative else base
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return InputObject(url, info.size or 0, mtime)


def input_failure(url: str, exc: BaseException, doing: str) -> InputError:
    """The input error of a filesystem failure on ``url``: what, where, and how to fix it,
    naming where credentials came from but never a secret."""
    shown = storage.public(url)
    detail = f"{type(exc).__name__}: {exc}"
    kind = storage.failure(exc)
    if kind == "not_found":
        return InputNotFound(
            f"Input {shown} does not exist (could not {doing} it)",
            expected="an existing bucket and a Parquet object or a prefix of them",
            found=detail,
            fix="Check the bucket and prefix, and the endpoint "
            f"({storage.endpoint()}, AWS_ENDPOINT_URL for an S3-compatible server)",
        )
    if kind == "denied":
        source = storage.credential_source(url)
        return InputAccessDenied(
            f"Access to input {shown} was denied (could not {doing} it)",
            expected="credentials allowed to list the prefix and read its objects",
            found=f"{detail}; credentials from {source or 'nowhere (none found)'}",
            fix="Set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE to credentials "
            "that may read it (s3:ListBucket on the bucket, s3:GetObject on the objects)",
        )
    if kind == "unreachable":
        return InputNotFound(
            f"Input {shown} could not be reached (could not {doing} it)",
            expected=f"an object store answering at {storage.endpoint()}",
            found=detail,
            fix="Check AWS_ENDPOINT_URL (or the network); the run was not started",
        )
    return CorruptInput(
        f"Input {shown} could not be read (could not {doing} it)",
        found=detail,
        fix="Check the URL and the object store",
    )


def inspect_input(
    input_path: str | Path,
    features: Sequence[str],
    key_column: str,
    *,
    feature_types: Mapping[str, str] | None = None,
    max_null_rate: float = 0.0,
) -> InputSummary:
    """Check every file's footer: key, feature columns, their types, null rates, ranges.

    On an object store each footer is a ranged read of the object's tail; the
    footers are read a few at a time, as their round trips dominate."""
    files = discover(input_path)
    described: list[InputFile] = []
    key_types: set[str] = set()
    digest = hashlib.sha256()
    for found, meta in zip(files, _footers(files), strict=True):
        path = found.path
        schema = meta.schema.to_arrow_schema()
        key_types.add(_check_key(path, schema, meta, key_column))
        _check_features(path, schema, features)
        _check_nulls(path, schema, meta, features, max_null_rate)
        _check_castable(path, schema, meta, features, feature_types or {})
        sizes = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        described.append(InputFile(path, sizes))
        digest.update(f"{path}|{found.size}|{found.mtime_ns}|{meta.num_rows}\n".encode())
    if len(key_types) > 1:
        raise BadKeyColumn(
            f"Key column '{key_column}' has different types across the input files",
            expected="one type (integer or string) in every file",
            found=", ".join(sorted(key_types)),
        )
    rows = sum(f.rows for f in described)
    if rows == 0:
        raise InputNotFound(
            f"Input {storage.public(input_path)} has no rows", expected="at least one row"
        )
    key_type: Literal["int", "string"] = "int" if key_types == {"int"} else "string"
    root = storage.public(input_path)
    return InputSummary(root, tuple(described), rows, digest.hexdigest(), key_type)


def _footers(files: Sequence[InputObject]) -> Iterator[pq.FileMetaData]:
    """Each file's footer, in order; remote ones fetched by a few threads at once."""
    if not files or not storage.is_remote(files[0].path):
        return (_read_footer(f.path) for f in files)
    with ThreadPoolExecutor(FOOTER_THREADS, thread_name_prefix="footers") as pool:
        return iter(list(pool.map(lambda f: _read_footer(f.path), files)))


def _read_footer(path: str) -> pq.FileMetaData:
    try:
        return storage.read_metadata(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        if storage.is_remote(path) and storage.failure(exc) != "other":
            raise input_failure(path, exc, "read the footer of") from None
        raise CorruptInput(
            f"Input file {storage.public(path)} is not a readable Parquet file",
            found=str(exc),
            fix="Rewrite or remove the file",
        ) from exc


def _check_key(path: str, schema: pa.Schema, meta: pq.FileMetaData, key: str) -> str:
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


def _check_features(path: str, schema: pa.Schema, features: Sequence[str]) -> None:
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
    path: str, schema: pa.Schema, meta: pq.FileMetaData, features: Sequence[str], bound: float
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
    path: str,
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
