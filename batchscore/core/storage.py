"""Locations of data and run folders: a local path, or an object-store URL (``s3://``,
``gs://``, ``abfs://``), behind one filesystem layer, ``pyarrow.fs``.

Every reader and writer of input files, parts and manifests goes through here, so that
workers on other hosts need no shared POSIX folder. An object store is reached as its
users' own tools reach it: ``pyarrow.fs.FileSystem.from_uri`` reads the SDK's standard
places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` and the shared credentials file, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for
an S3-compatible server; Google's and Azure's defaults likewise), with no batchscore
setting. (Measured with pyarrow 25: ``from_uri`` honours ``AWS_ENDPOINT_URL``, the bare
``S3FileSystem()`` does not, and neither reads a profile's ``endpoint_url``.)

Invariant kept on every store: an object under its final name is complete. A local file is
written under a hidden temporary name, synced and renamed; an object is uploaded under a
hidden temporary key and then copied to its final key in one request (``FileSystem.move``),
so that an upload cut short, which the SDK may still complete with what it had, never
lands under the final name. Readers skip names starting with ``.`` or ``_``.

Light at its top (DAG files import the settings): pyarrow is imported where it is used.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

#: URL schemes read through ``pyarrow.fs`` (S3, Google Cloud Storage, Azure Data Lake).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")
#: Variables the cloud SDKs read: a filesystem built under others is built again.
SDK_VARIABLE_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "GCS_")
#: The SDKs' words for refused credentials (pyarrow's messages carry the AWS error name).
DENIED_CODES = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "FORBIDDEN",
    "MISSING_AUTHENTICATION_TOKEN",
    "EXPIRED_TOKEN",
    "UNRECOGNIZED_CLIENT",
    "INVALID_CLIENT_TOKEN_ID",
    "HTTP RESPONSE CODE 403",
    "HTTP 403",
)
Failure = Literal["not_found", "denied", "unreachable", "other"]

_cache: dict[tuple[str, ...], pafs.FileSystem] = {}
_cache_lock = threading.Lock()


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is an object-store URL rather than a local path."""
    text = str(location)
    return "://" in text and urlsplit(text).scheme.lower() in REMOTE_SCHEMES


def public(location: str | Path) -> str:
    """``location`` as it may be shown and recorded: a URL without user or password."""
    text = str(location)
    if not is_remote(text):
        return text
    credentials = _credentials(text)
    if credentials is not None:
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{rest[len(credentials) + 1 :]}"
    parts = urlsplit(text)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def carries_secret(location: str | Path) -> bool:
    """A URL with a key or password in it (``s3://KEY:SECRET@bucket/``): such a URL
    would be written to manifests and logs; credentials belong in the SDK's places."""
    text = str(location)
    return is_remote(text) and (
        _credentials(text) is not None or urlsplit(text).password is not None
    )


def _credentials(url: str) -> str | None:
    """The ``KEY:SECRET`` before the bucket of an S3 or GCS URL, or None. Not by
    ``urlsplit``: a secret may hold a ``/`` (AWS secrets do), which ends its host part
    early, and bucket names hold neither ``:`` nor ``@``."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("s3", "gs", "gcs") or "@" not in rest:
        return None
    head = rest.split("@", 1)[0]
    user = head.split(":", 1)[0]
    return head if ":" in head and "/" not in user else None


def join(location: str | Path, *names: str) -> str:
    """``location`` / ``names``, as a URL for a URL and a path for a path."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *(n.strip("/") for n in names)])
    return str(Path(location, *names))


def name_of(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent_of(location: str | Path) -> str:
    if is_remote(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``location`` and the path on it.

    S3 and GCS filesystems are built once per bucket and process (region lookup and
    credential chain included), and again when an SDK variable changes.
    """
    import pyarrow.fs as pafs

    text = str(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("s3", "gs", "gcs"):  # abfs: the container's place in the URL varies
        return pafs.FileSystem.from_uri(text)
    bucket = parts.netloc.rsplit("@", 1)[-1]
    path = f"{bucket}/{parts.path.lstrip('/')}".rstrip("/")
    sdk = tuple(
        f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(SDK_VARIABLE_PREFIXES)
    )
    key = (scheme, parts.netloc, *sdk)
    with _cache_lock:
        found = _cache.get(key)
    if found is None:
        found, _ = pafs.FileSystem.from_uri(urlunsplit((scheme, parts.netloc, "/", "", "")))
        with _cache_lock:
            _cache[key] = found
    return found, path


def file_info(location: str | Path) -> pafs.FileInfo:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path)


def exists(location: str | Path) -> bool:
    """Whether a file or object is there (a folder or prefix is not a file)."""
    if not is_remote(location):
        return Path(location).is_file()
    import pyarrow.fs as pafs

    return file_info(location).type == pafs.FileType.File


@dataclass(frozen=True)
class Stat:
    """What identifies one version of a file or object: its size and modification time."""

    st_size: int
    st_mtime_ns: int


def stat(location: str | Path) -> Stat | os.stat_result:
    """``os.stat`` of a local file; the size and mtime an object store lists for an object
    (``FileNotFoundError`` when there is none)."""
    if not is_remote(location):
        return Path(location).stat()
    import pyarrow.fs as pafs

    info = file_info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"No object at {public(location)}")
    return Stat(info.size or 0, info.mtime_ns or 0)


def run_files(root: str | Path, name: str) -> list[str]:
    """Every ``root/*/name`` (a file in each folder of ``root``: each run's manifest),
    oldest first by modification time; none when ``root`` does not exist."""
    if not is_remote(root):
        found = [(p.stat().st_mtime_ns, str(p)) for p in Path(root).glob(f"*/{name}")]
        return [location for _, location in sorted(found)]
    import pyarrow.fs as pafs

    filesystem, path = resolve(root)
    listed = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    base = str(root).rstrip("/")
    found = [
        (info.mtime_ns or 0, f"{base}/{info.path[len(path) :].lstrip('/')}")
        for info in listed
        if info.type == pafs.FileType.File
        and info.path[len(path) :].lstrip("/").count("/") == 1
        and info.base_name == name
    ]
    return [location for _, location in sorted(found)]


@dataclass(frozen=True)
class Entry:
    """A file or object under a folder: its path relative to the folder ("/"-separated)
    and when it was last written."""

    name: str
    mtime_ns: int


def files_under(root: str | Path) -> list[Entry]:
    """Every file (object) under ``root`` at any depth, in one listing on a store; none
    when ``root`` does not exist. A store's empty folder markers are folders, not files."""
    if not is_remote(root):
        return _local_files_under(Path(root))
    import pyarrow.fs as pafs

    filesystem, path = resolve(root)
    listed = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [
        Entry(info.path[len(path) :].lstrip("/"), info.mtime_ns or 0)
        for info in listed
        if info.type == pafs.FileType.File
    ]


def _local_files_under(base: Path) -> list[Entry]:
    found = []
    for path in base.rglob("*") if base.is_dir() else ():
        try:
            if path.is_file():
                found.append(Entry(path.relative_to(base).as_posix(), path.stat().st_mtime_ns))
        except FileNotFoundError:  # deleted while listed
            continue
    return found


def folders(root: str | Path) -> list[str]:
    """The folders (on a store: the prefixes) directly in ``root``, as paths or URLs, by
    name; none when ``root`` does not exist. One delimited listing on a store."""
    if not is_remote(root):
        base = Path(root)
        return sorted(str(p) for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    import pyarrow.fs as pafs

    filesystem, path = resolve(root)
    listed = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(join(root, i.base_name) for i in listed if i.type == pafs.FileType.Directory)


def is_within(location: str | Path, folder: str | Path) -> bool:
    """Whether ``location`` is ``folder`` or lies under it: two paths, or two URLs of one
    bucket (a path is never within a URL, nor the other way round)."""
    if is_remote(location) != is_remote(folder):
        return False
    if not is_remote(folder):
        return Path(location).is_relative_to(folder)
    inner, outer = _comparable(str(location)), _comparable(str(folder))
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _comparable(url: str) -> str:
    parts = urlsplit(public(url))
    path = "/".join(p for p in parts.path.split("/") if p)
    return f"{parts.scheme.lower()}://{parts.netloc}/{path}"


def is_temporary(name: str) -> bool:
    """Whether a file's name is that of a staged upload or write (``put_bytes``): what a
    writer killed before its rename or copy leaves behind."""
    return _TEMPORARY.fullmatch(name_of(name)) is not None


_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


def delete(location: str | Path) -> None:
    """Delete one file or object; one that is gone already is no error."""
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    filesystem, path = resolve(location)
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass


def delete_tree(location: str | Path) -> None:
    """Delete a folder (on a store: every object under the prefix) and all it holds; one
    that is gone already is no error. Not one step on a store: a caller deletes first
    what makes the folder count (a run's manifest), so a crash leaves no folder that
    looks complete, and deletes the rest again later."""
    if not is_remote(location):
        import shutil

        shutil.rmtree(location, ignore_errors=True)
        return
    filesystem, path = resolve(location)
    try:
        filesystem.delete_dir(path)
    except FileNotFoundError:
        pass


def open_parquet(location: str | Path, *, buffer_size: int = 1 << 20) -> pq.ParquetFile:
    """A Parquet file to read footers and row groups from.

    On an object store each read is a ranged GET: the footer is one read of the file's
    tail, and ``pre_buffer`` coalesces a row group's column chunks into few requests, so
    nothing but the requested columns of the requested row groups is fetched.
    """
    import pyarrow.parquet as pq

    if not is_remote(location):
        return pq.ParquetFile(str(location), memory_map=False, buffer_size=buffer_size)
    filesystem, path = resolve(location)
    return pq.ParquetFile(filesystem.open_input_file(path), pre_buffer=True)


def read_metadata(location: str | Path) -> pq.FileMetaData:
    return open_parquet(location).metadata


def read_bytes(location: str | Path) -> bytes:
    if not is_remote(location):
        return Path(location).read_bytes()
    filesystem, path = resolve(location)
    with filesystem.open_input_stream(path) as stream:
        return bytes(stream.read())


def _temporary(location: str) -> str:
    return join(parent_of(location), f".{name_of(location)}.{uuid.uuid4().hex}.tmp")


def put_bytes(location: str | Path, data: bytes | pa.Buffer) -> None:
    """Publish ``data`` under ``location`` whole: uploaded under a hidden temporary key,
    then copied to ``location`` in one request (local files: ``batchscore.core.durable``)."""
    from batchscore.core.durable import sync, write_durably

    text = str(location)
    if not is_remote(text):
        path = Path(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(_temporary(text))
        try:
            write_durably(temporary, bytes(data))
            os.replace(temporary, path)
            sync(path.parent)
        finally:
            temporary.unlink(missing_ok=True)
        return
    filesystem, key = resolve(text)
    _, staged = resolve(_temporary(text))
    stream = filesystem.open_output_stream(staged)
    stream.write(data)
    stream.close()  # only after every byte was handed over: see the module's docstring
    try:
        filesystem.move(staged, key)  # a copy in one request, then the staged object deleted
    except BaseException:
        _delete_quietly(filesystem, staged)
        raise


def _delete_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except OSError:  # gone already (a move deletes its source)
        pass


def write_parquet(table: pa.Table, location: str | Path, **options: object) -> None:
    """Write ``table`` as Parquet under ``location``; complete or not there at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)  # type: ignore[arg-type]
    put_bytes(location, sink.getvalue())


def put_tree(folder: str | Path, location: str) -> None:
    """Copy a local folder's files to ``location`` (an object-store prefix)."""
    import pyarrow.fs as pafs

    filesystem, path = resolve(location)
    pafs.copy_files(
        str(Path(folder).absolute()),
        path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=filesystem,
    )


def get_tree(location: str, folder: Path) -> Path:
    """The files under ``location`` in a local ``folder``, fetched once per machine: into a
    hidden sibling first, then renamed, so that a folder that exists is complete."""
    import pyarrow.fs as pafs

    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}")
    filesystem, path = resolve(location)
    pafs.copy_files(
        path,
        str(staged),
        source_filesystem=filesystem,
        destination_filesystem=pafs.LocalFileSystem(),
    )
    try:
        os.rename(staged, folder)
    except OSError:  # another process of this machine got there first
        import shutil

        shutil.rmtree(staged, ignore_errors=True)
    return folder


def move(source: str | Path, target: str | Path) -> None:
    """Move a file or object (on one store); an object is copied, then deleted."""
    if not is_remote(source):
        os.replace(source, target)
        return
    filesystem, source_path = resolve(source)
    _, target_path = resolve(target)
    filesystem.move(source_path, target_path)


def failure(exc: BaseException) -> Failure:
    """What an error of the filesystem layer means for the user: the thing is not there,
    the credentials are refused or missing, the store cannot be reached, or other."""
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, PermissionError):
        return "denied"
    if type(exc).__name__ == "ArrowInvalid":  # the bytes were read: they are not Parquet
        return "other"
    text = str(exc).upper()
    if any(s in text for s in ("NO_SUCH_BUCKET", "NO_SUCH_KEY", "RESOURCE_NOT_FOUND")):
        return "not_found"
    if any(s in text for s in DENIED_CODES):
        return "denied"
    if any(s in text for s in ("NETWORK_CONNECTION", "COULD NOT RESOLVE", "COULDN'T CONNECT")):
        return "unreachable"
    if "INTERNAL_FAILURE" in text and not credential_source(""):
        return "denied"  # the SDK's word for an unsigned request refused
    return "other"


def credential_source(location: str | Path) -> str:
    """Where the S3 SDK finds credentials, named without the values (for error messages):
    the variables, a profile, or the shared credentials file; "" when none of them."""
    if location and urlsplit(str(location)).scheme.lower() not in ("s3", ""):
        return "the SDK's default credentials"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    profile = os.environ.get("AWS_PROFILE")
    if profile:
        return f"the profile {profile!r} (AWS_PROFILE)"
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
    if Path(shared).expanduser().is_file():
        return f"the default profile of {shared}"
    return ""


def endpoint() -> str:
    """The S3 endpoint requests go to, for error messages: ``AWS_ENDPOINT_URL`` or AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
