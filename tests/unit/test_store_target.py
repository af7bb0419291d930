"""The one store opener's secrets: labels without them, pickles without them."""

from __future__ import annotations

import pickle

import pytest

from batchscore.core.settings import RunSettings, load_settings
from batchscore.core.urls import public_url, split_password
from jobs.errors import RunError
from jobs.manifest import RunParams
from kv_export.connect import StoreTarget, store_target


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://scorer:pw@h:1/2", "redis://scorer@h:1/2"),
        (
            "rediss://h:6380/0?ssl_ca_certs=/ca.pem&password=pw",
            "rediss://h:6380/0?ssl_ca_certs=%2Fca.pem",
        ),
        ("lmdb:///var/store", "lmdb:///var/store"),
        ("/var/store", "lmdb:///var/store"),
        ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
    ],
)
def test_a_label_shows_the_store_and_no_secret(url: str, label: str) -> None:
    assert public_url(url) == label


def test_split_password_keeps_the_user() -> None:
    assert split_password("redis://scorer:pw@h:1/0") == ("redis://scorer@h:1/0", "pw")
    assert split_password("redis://h:1/0") == ("redis://h:1/0", None)


def test_a_password_in_the_url_moves_to_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHSCORE_STORE_URL", "redis://scorer:from-url@h:1/0")
    monkeypatch.setenv("BATCHSCORE_STORE_PASSWORD", "from-setting")
    settings = load_settings(RunSettings)
    assert settings.resolved_store_url == "redis://scorer@h:1/0"
    assert settings.store_password == "from-url", "the URL's password wins"
    assert "from-url" not in repr(settings)


def test_a_target_travels_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHSCORE_STORE_PASSWORD", "the-workers-own")
    target = StoreTarget("redis://h:1/0", password="the-drivers")
    sent = pickle.dumps(target)
    assert b"the-drivers" not in sent and "the-drivers" not in repr(target)
    arrived = pickle.loads(sent)
    assert arrived.url == target.url and arrived.password == "the-workers-own"
    assert store_target(load_settings(RunSettings), "redis://h:1/0").password == "the-workers-own"


def test_run_parameters_refuse_a_password() -> None:
    with pytest.raises(RunError, match="BATCHSCORE_STORE_PASSWORD") as caught:
        RunParams(
            input_path="in", model_uri="models:/m/1", key_column="k", batch_size=0,
            workers=1, shard_rows=10, store_url="redis://:hunter2@h:1/0",
        )  # fmt: skip
    assert "hunter2" not in str(caught.value)
