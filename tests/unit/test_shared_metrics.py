"""The metrics folder ``batchscore serve --workers N`` gives its workers
(``PROMETHEUS_MULTIPROC_DIR``): the user's when set, else a private one that goes away.

Only the variable and the folder are checked here; prometheus_client chose its mode
for this process when it was imported (above, before any test sets the variable).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchscore.core.errors import SettingsError
from lookup.observability import MULTIPROC_DIR, shared_metrics_dir, shared_metrics_for_workers


def test_without_the_variable_a_private_folder_lives_as_long_as_the_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(MULTIPROC_DIR, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile caches the folder it found
    assert shared_metrics_dir() is None
    with shared_metrics_for_workers() as folder:
        assert os.environ[MULTIPROC_DIR] == folder == shared_metrics_dir()
        assert Path(folder).parent == tmp_path
        assert Path(folder).stat().st_mode & 0o777 == 0o700
        (Path(folder) / "counter_1.db").write_bytes(b"")
    assert not Path(folder).exists()
    assert MULTIPROC_DIR not in os.environ


def test_the_users_folder_is_used_and_left_as_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(MULTIPROC_DIR, str(tmp_path))
    (tmp_path / "counter_1.db").write_bytes(b"")
    with shared_metrics_for_workers() as folder:
        assert folder == str(tmp_path)
    assert os.environ[MULTIPROC_DIR] == str(tmp_path)
    assert (tmp_path / "counter_1.db").exists()


@pytest.mark.parametrize("value", ["missing", ""])
def test_a_variable_that_names_no_folder_is_refused_with_its_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv(MULTIPROC_DIR, str(tmp_path / value) if value else "")
    with pytest.raises(SettingsError, match=f"{MULTIPROC_DIR}=.* is not a folder"):
        shared_metrics_dir()
