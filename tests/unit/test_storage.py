"""batchscore.core.storage: locations as paths or URLs, and what a failure means."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from batchscore.core import storage


@pytest.mark.parametrize(
    ("location", "remote"),
    [
        ("s3://bucket/prefix/", True),
        ("S3://bucket/x.parquet", True),
        ("gs://bucket/x", True),
        ("abfs://container@account.dfs.core.windows.net/x", True),
        ("/data/in", False),
        ("relative/folder", False),
        ("file:///data/in", False),
        ("lmdb:///store", False),
    ],
)
def test_is_remote(location: str, remote: bool) -> None:
    assert storage.is_remote(location) is remote


def test_a_url_is_shown_without_its_credentials() -> None:
    url = "s3://AKIAXXXX:very-secret@bucket/prefix/"
    assert storage.carries_secret(url)
    assert storage.public(url) == "s3://bucket/prefix/"
    assert not storage.carries_secret("s3://bucket/prefix/")
    assert storage.public("/local/path") == "/local/path"
    slashed = "s3://AKIAXXXX:abc/def+ghi@bucket/prefix/"  # AWS secrets may hold a "/"
    assert storage.carries_secret(slashed)
    assert storage.public(slashed) == "s3://bucket/prefix/"
    assert not storage.carries_secret("s3://bucket/odd:name@2026.parquet")


def test_join_name_and_parent_keep_urls_whole() -> None:
    assert storage.join("s3://b/runs/", "ns", "run-1") == "s3://b/runs/ns/run-1"
    assert storage.join("/runs", "ns", "manifest.json") == str(Path("/runs/ns/manifest.json"))
    assert storage.name_of("s3://b/runs/ns/run-1/") == "run-1"
    assert storage.parent_of("s3://b/runs/ns/part-00001.parquet") == "s3://b/runs/ns"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (FileNotFoundError("Path does not exist 'b/x/'"), "not_found"),
        (OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation"), "not_found"),
        (OSError("AWS Error ACCESS_DENIED during GetObject operation: "), "denied"),
        (OSError("AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation"), "denied"),
        (OSError("AWS Error SIGNATURE_DOES_NOT_MATCH during ListObjectsV2"), "denied"),
        (OSError("AWS Error NETWORK_CONNECTION during HeadBucket: curlCode: 7"), "unreachable"),
        (pa.ArrowInvalid("Parquet magic bytes not found in footer"), "other"),
    ],
)
def test_failures_are_told_apart(error: BaseException, kind: str) -> None:
    assert storage.failure(error) == kind


def test_a_local_file_is_put_whole_and_read_back(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "manifest.json"
    storage.put_bytes(target, b'{"a": 1}')
    assert storage.exists(target) and storage.read_bytes(target) == b'{"a": 1}'
    assert storage.stat(target).st_size == 8
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]  # no temporary left


def test_credential_source_names_places_never_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    assert storage.credential_source("s3://b/") == ""
    monkeypatch.setenv("AWS_PROFILE", "team")
    assert storage.credential_source("s3://b/") == "the profile 'team' (AWS_PROFILE)"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    assert "AKIAEXAMPLE" not in storage.credential_source("s3://b/")


def test_object_store_input_is_read_ahead_of_the_forward_pass_on_cpu_too() -> None:
    from scoring.engine import prefetch_depth

    assert prefetch_depth(None, "cpu", remote=True) == 2  # reads wait on the network
    assert prefetch_depth(None, "cpu", remote=False) == 0
    assert prefetch_depth(0, "cpu", remote=True) == 0  # BATCHSCORE_PREFETCH_ROW_GROUPS wins


def test_run_files_lists_one_file_per_run_folder_oldest_first(tmp_path: Path) -> None:
    import os

    for index, run in enumerate(["b", "a", "c"]):
        storage.put_bytes(tmp_path / run / "manifest.json", b"{}")
        os.utime(tmp_path / run / "manifest.json", ns=(index * 10**9, index * 10**9))
    storage.put_bytes(tmp_path / "a" / "parts" / "manifest.json", b"{}")  # not a run's
    found = storage.run_files(tmp_path, "manifest.json")
    assert found == [str(tmp_path / r / "manifest.json") for r in ("b", "a", "c")]
    assert storage.run_files(tmp_path / "none", "manifest.json") == []
