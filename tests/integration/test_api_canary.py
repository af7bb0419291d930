"""The lookup API during a canary, over real HTTP (``batchscore serve``): each key answered
by the version the namespace's rule gives it, in single and batch lookups, through the
batch fallback when Redis dies, counted by version and role in ``/metrics``, and never from
a version outside the rule while the canary starts, ramps, is aborted and promoted."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from kv_export.encoding import canary_slot
from kv_export.store import open_store
from tests.conftest import RedisServer
from tests.integration.test_api_service import Start, export_version, score, write_version

pytestmark = [pytest.mark.slow]
NS = "churn"
KEYS = np.arange(2_000_000, 2_002_000, dtype=np.int64)


def in_canary(key: int, percent: float) -> bool:
    return canary_slot(str(key).encode()) < round(percent * 100)


def expected(key: int, percent: float | None) -> tuple[str, bool]:
    """The model version (1 live, 2 canary) and canary flag the rule gives ``key``."""
    canary = percent is not None and in_canary(key, percent)
    return ("2" if canary else "1"), canary


def check(item: dict, key: int, percent: float | None, versions: dict[str, int]) -> None:
    model, canary = expected(key, percent)
    assert item["model"]["version"] == model and item["canary"] is canary, (key, item)
    assert item["version"] == versions[model]
    assert item["prediction"]["churn_probability"] == pytest.approx(
        float(score(np.array([key]), model)[0])
    )


def answers_by_role(metrics: str) -> dict[tuple[str, str, str], float]:
    counts: dict[tuple[str, str, str], float] = {}
    for line in metrics.splitlines():
        if line.startswith("batchscore_lookup_answers_total{"):
            labels = dict(
                part.split("=", 1)
                for part in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            key = (labels["version"].strip('"'), labels["role"].strip('"'))
            key3 = (*key, labels["outcome"].strip('"'))
            counts[key3] = counts.get(key3, 0) + float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.redis
def test_a_canary_answers_its_share_of_keys_and_the_fallback_keeps_to_it(
    tmp_path: Path,
    redis_server: RedisServer,
    api_env: dict[str, str],
    start_api: Start,
) -> None:
    url = redis_server.url
    a = write_version(url, tmp_path / "a", KEYS, "1", NS)
    b = export_version(url, tmp_path / "b", KEYS, "2", NS)
    store = open_store(url)
    store.start_canary(NS, b.version, 20)
    versions = {"1": a.version, "2": b.version}
    api = start_api(api_env | {"BATCHSCORE_ACCESS_LOG": "false"}, url)
    sample = [int(k) for k in KEYS[::20]]
    canary_keys = [k for k in sample if in_canary(k, 20)]
    assert 0.1 < len(canary_keys) / len(sample) < 0.3
    for key in sample:
        check(api.get(f"/v1/predictions/{NS}/{key}").json(), key, 20, versions)
    batch = api.post(f"/v1/predictions/{NS}/batch", {"keys": [str(k) for k in sample]}).json()
    for key, item in zip(sample, batch["results"], strict=True):
        assert item["status"] == "found" and item["source"] == "kv"
        check(item, key, 20, versions)

    # Keys neither version holds: each "not found" names the version its key went to.
    absent = [k for k in range(1, 400) if in_canary(k, 20)][:3] + [
        k for k in range(1, 400) if not in_canary(k, 20)
    ][:3]
    missing = api.post(f"/v1/predictions/{NS}/batch", {"keys": [str(k) for k in absent]}).json()
    assert [(i["status"], i["version"], i["canary"]) for i in missing["results"]] == [
        ("not_found", b.version, True)
    ] * 3 + [("not_found", a.version, False)] * 3
    single = api.get(f"/v1/predictions/{NS}/{absent[0]}")
    assert single.status_code == 404 and f"canary version {b.version}" in single.text

    counts = answers_by_role(api.get("/metrics").text)
    assert counts[(str(b.version), "canary", "found")] == 2 * len(canary_keys)
    assert counts[(str(a.version), "live", "found")] == 2 * (len(sample) - len(canary_keys))
    assert counts[(str(b.version), "canary", "not_found")] == 4
    assert counts[(str(a.version), "live", "not_found")] == 3

    # Redis dies: the batch fallback reads each key from the parts of its own version.
    redis_server.stop()
    fallback = api.post(f"/v1/predictions/{NS}/batch", {"keys": [str(k) for k in sample]}).json()
    for key, item in zip(sample, fallback["results"], strict=True):
        assert item["source"] == "batch"
        check(item, key, 20, versions)
    one = api.get(f"/v1/predictions/{NS}/{canary_keys[0]}").json()
    assert one["source"] == "batch"
    check(one, canary_keys[0], 20, versions)


def test_readers_during_canary_changes_get_no_version_outside_the_rule(
    tmp_path: Path, api_env: dict[str, str], start_api: Start
) -> None:
    """While the canary starts, ramps, is aborted, starts again and is promoted, every batch
    answer is the rule of one state the changes wrote: each key from the version that
    state gives it, never a third version, never a gap."""
    url = f"lmdb://{tmp_path / 'store'}"
    a = write_version(url, tmp_path / "a", KEYS, "1", NS)
    b = export_version(url, tmp_path / "b", KEYS, "2", NS)
    api = start_api(api_env | {"BATCHSCORE_LIVE_CACHE_SECONDS": "0.05"}, url)
    versions = {"1": a.version, "2": b.version}
    keys = [int(k) for k in KEYS[::10]]
    shares = {None: 0, 10.0: 0, 50.0: 0, 5.0: 0, "promoted": 0}
    wrong: list[object] = []
    stop = threading.Event()

    def which_state(results: list[dict]) -> object:
        if all(r["version"] == b.version and not r["canary"] for r in results):
            return "promoted"
        for share in (None, 10.0, 50.0, 5.0):
            if all(
                expected(k, share)[1] == r["canary"] for k, r in zip(keys, results, strict=True)
            ):
                return share
        return "none of them"

    def read() -> None:
        body = {"keys": [str(k) for k in keys]}
        while not stop.is_set():
            results = api.post(f"/v1/predictions/{NS}/batch", body).json()["results"]
            state = which_state(results)
            if state not in shares or any(r["status"] != "found" for r in results):
                wrong.append(results)
                continue
            shares[state] += 1  # type: ignore[index]
            if state != "promoted":
                for key, item in zip(keys, results, strict=True):
                    try:
                        check(item, key, state, versions)  # type: ignore[arg-type]
                    except AssertionError as exc:
                        wrong.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    store = open_store(url)

    def seen(share: object) -> None:
        count = shares[share]  # type: ignore[index]
        deadline = 200
        while shares[share] < count + 3 and deadline and not wrong:  # type: ignore[index]
            deadline -= 1
            stop.wait(0.05)
        assert deadline, f"the readers never saw {share}"

    try:
        seen(None)
        store.start_canary(NS, b.version, 10)
        seen(10.0)
        store.set_canary_percent(NS, 50)
        seen(50.0)
        store.abort_canary(NS)
        seen(None)
        store.start_canary(NS, b.version, 5)
        seen(5.0)
        store.promote_canary(NS, keep=3)
        seen("promoted")
    finally:
        stop.set()
        reader.join()
    assert wrong == []
