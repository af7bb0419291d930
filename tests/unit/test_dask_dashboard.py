"""Which clusters started for a run serve a Dask dashboard (``BATCHSCORE_DASHBOARD``)."""

from __future__ import annotations

import importlib.util
import logging
import urllib.request

import pytest

from batchscore.core.errors import SettingsError
from batchscore.core.settings import RunSettings, load_settings
from jobs.steps import make_params
from scoring import engine


@pytest.mark.parametrize(
    ("cluster", "wanted", "expected"),
    [
        ("local", None, None),  # in-process: its start-up costs more than a short run gains
        ("processes", None, ":0"),
        ("cuda", None, ":0"),
        ("local", True, ":0"),
        ("processes", False, None),
        ("cuda", False, None),
    ],
)
def test_dashboard_by_cluster_and_setting(
    cluster: str, wanted: bool | None, expected: str | None
) -> None:
    assert engine.dashboard_address(cluster, wanted) == expected


def test_asked_for_without_bokeh_warns_and_serves_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bokeh" else real(name, *a)
    )
    with caplog.at_level(logging.WARNING, logger=engine.__name__):
        assert engine.dashboard_address("local", True) is None
    assert "needs bokeh" in caplog.text


def test_the_setting_reaches_the_run_params(monkeypatch: pytest.MonkeyPatch) -> None:
    common = {"input_path": "in", "model_uri": "models:/m/1", "key_column": "id"}
    monkeypatch.delenv("BATCHSCORE_DASHBOARD", raising=False)
    assert make_params(load_settings(RunSettings), **common).dashboard is None
    monkeypatch.setenv("BATCHSCORE_DASHBOARD", "true")
    assert make_params(load_settings(RunSettings), **common).dashboard is True
    assert make_params(load_settings(RunSettings), dashboard=False, **common).dashboard is False
    monkeypatch.setenv("BATCHSCORE_DASHBOARD", "maybe")
    with pytest.raises(SettingsError, match="BATCHSCORE_DASHBOARD='maybe'"):
        load_settings(RunSettings)


def test_the_in_process_cluster_serves_a_dashboard_only_when_asked() -> None:
    with engine.dask_client("local", 1, 1) as client:
        assert engine.dashboard_link(client, "local", None) is None
        # Its scheduler's HTTP server (/health) is on a free loopback port, not Dask's 8787.
        assert client.cluster.scheduler.http_server.port != 8787  # type: ignore[union-attr]
    with engine.dask_client("local", 1, 1, dashboard=True) as client:
        link = engine.dashboard_link(client, "local", True)
        assert link is not None and link.startswith("http://")
        with urllib.request.urlopen(link, timeout=30) as page:  # noqa: S310  (loopback)
            assert page.status == 200 and b"bokeh" in page.read().lower()


def bare_http_server(client: object) -> tuple[str, int]:
    """Where the scheduler's HTTP server (/health, /metrics) listens."""
    server = client.cluster.scheduler.http_server  # type: ignore[attr-defined]
    (sockets,) = [list(server._sockets.values())]
    return sockets[0].getsockname()[:2]  # type: ignore[no-any-return]


@pytest.mark.parametrize("cluster", ["local", "processes"])
def test_without_a_dashboard_the_http_server_is_on_a_free_loopback_port(cluster: str) -> None:
    """Not Dask's 8787, which another Dask on the host may hold; not on every interface."""
    with engine.dask_client(cluster, 1, 1, dashboard=False) as client:
        host, port = bare_http_server(client)
        assert host == "127.0.0.1" and port != 8787
        assert engine.dashboard_link(client, cluster, False) is None
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=30) as answer:  # noqa: S310
            assert answer.read() == b"ok"
