"""Kill ``batchscore run`` anywhere, run it again: the run completes, nothing is lost or doubled.

A reference run measures how long each step takes. Then, at 20 seeded points spread
over every step (resolve through publish), a fresh run of its own namespace is killed
with SIGKILL — its whole process group, Dask workers included, as a lost machine or an
OOM-killed container would be — and the same command is run again. Each time: the rerun
succeeds; the rows scored before the kill (complete parts) plus the rows the rerun
scored are exactly the input's rows, and the parts hold every key once; the store holds
one version of the namespace, live, published once. The same with Redis killed
(SIGKILL, data kept by its append-only file) right as the run reaches its publish step.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kv_export.store import open_store
from tests.conftest import BIN, KEY, RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ROWS = 12_000
SEED = 20261206
STEPS = ("resolve", "plan", "score", "validate", "drift", "export", "publish")
KILLS_PER_STEP = {"resolve": 3, "plan": 3, "score": 4, "validate": 3, "drift": 2}
KILLS_PER_STEP |= {"export": 3, "publish": 2}  # 20 in all
POLL = 0.01


def start_run(env: dict[str, str], dataset: Path, namespace: str, store: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "batchscore"), "run", "--input", str(dataset), "--model", "models:/churn/1",
         "--key-column", KEY, "--namespace", namespace, "--store", store],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def run_to_end(env: dict[str, str], dataset: Path, namespace: str, store: str) -> None:
    process = start_run(env, dataset, namespace, store)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise AssertionError(f"{namespace}: the rerun did not end in 300 s") from None
    assert process.returncode == 0, f"{namespace}: rerun failed\n{err[-4000:]}"


def manifest_of(home: Path, namespace: str) -> dict | None:
    found = list((home / "runs" / namespace).glob("*/manifest.json"))
    if not found:
        return None
    try:
        return dict(json.loads(found[0].read_text()))
    except (json.JSONDecodeError, FileNotFoundError):  # never half-written: renamed in place
        raise AssertionError(f"unreadable manifest {found[0]}") from None


def wait_for_step_before(
    process: subprocess.Popen, home: Path, namespace: str, step: str, deadline: float
) -> float:
    """Wait until the step before ``step`` is recorded (``step`` has begun); its time."""
    index = STEPS.index(step)
    while time.monotonic() < deadline and process.poll() is None:
        if index == 0:
            return time.monotonic()
        manifest = manifest_of(home, namespace)
        if manifest and STEPS[index - 1] in manifest["steps"]:
            return time.monotonic()
        time.sleep(POLL)
    return time.monotonic()


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate(timeout=60)


def parts_rows(home: Path, namespace: str) -> tuple[int, int]:
    """Rows in the complete parts of the namespace's run, and distinct keys among them."""
    parts = list((home / "runs" / namespace).glob("*/parts/*.parquet"))
    keys = [pq.read_table(p, columns=[KEY]).column(KEY) for p in parts]
    flat = [k for column in keys for k in column.to_pylist()]
    return len(flat), len(set(flat))


def check_once(home: Path, namespace: str, store_url: str, rows_before: int) -> None:
    manifest = manifest_of(home, namespace)
    assert manifest is not None
    scored_again = manifest["steps"]["score"]["rows_scored"]
    assert rows_before + scored_again == ROWS, (
        f"{namespace}: {rows_before} rows in parts before the rerun, {scored_again} scored "
        f"by it: a row was scored twice or never"
    )
    assert parts_rows(home, namespace) == (ROWS, ROWS), f"{namespace}: parts lose or repeat keys"
    state = open_store(store_url).state(namespace)
    assert list(state.versions) == [state.live], f"{namespace}: {state}"
    assert state.history == [state.live] and state.live_info().key_count == ROWS  # type: ignore[union-attr]


@pytest.mark.timeout(2400)  # 21 runs and 20 reruns of the CLI, each ~15 s on 2 cores
def test_a_run_killed_anywhere_completes_on_rerun_with_every_row_once(
    env: dict[str, str], dataset: Path
) -> None:
    home = Path(env["BATCHSCORE_HOME"])
    store = f"lmdb://{home / 'store'}"
    started = time.monotonic()
    reference = start_run(env, dataset, "reference", store)
    first_manifest = None
    while reference.poll() is None:
        if first_manifest is None and manifest_of(home, "reference") is not None:
            first_manifest = time.monotonic() - started
        time.sleep(POLL)
    assert reference.returncode == 0, reference.communicate()[1][-4000:]
    timings = manifest_of(home, "reference")["steps"]  # type: ignore[index]
    seconds = {s: float(timings[s]["seconds"]) for s in STEPS[1:]}
    seconds["resolve"] = first_manifest or float(timings["resolve"]["seconds"])

    chooser = random.Random(SEED)
    points = [(s, chooser.random()) for s, n in KILLS_PER_STEP.items() for _ in range(n)]
    killed_in: list[str] = []
    for i, (step, share) in enumerate(points):
        namespace = f"kill{i:02d}"
        process = start_run(env, dataset, namespace, store)
        began = wait_for_step_before(process, home, namespace, step, time.monotonic() + 300)
        time.sleep(max(0.0, began + share * seconds[step] - time.monotonic()))
        manifest = manifest_of(home, namespace)
        killed_in.append(
            f"{step}+{share:.2f}: "
            + (
                "finished"
                if process.poll() is not None
                else f"after {list(manifest['steps']) if manifest else 'nothing'}"
            )
        )
        kill_group(process)
        rows_before = parts_rows(home, namespace)[0]
        print(f"{namespace}: killed in {killed_in[-1]}; rerunning", flush=True)
        run_to_end(env, dataset, namespace, store)
        check_once(home, namespace, store, rows_before)
    print("\n".join(killed_in))
    reached = {entry.split("+")[0] for entry in killed_in if "finished" not in entry}
    assert reached == set(STEPS), f"kills landed only in {sorted(reached)}: {killed_in}"


@pytest.mark.redis
def test_redis_killed_as_the_run_publishes(
    env: dict[str, str], dataset: Path, tmp_path: Path
) -> None:
    home = Path(env["BATCHSCORE_HOME"])
    server = RedisServer(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    try:
        process = start_run(env, dataset, "redis_dies", server.url)
        wait_for_step_before(process, home, "redis_dies", "publish", time.monotonic() + 300)
        assert server.process is not None
        server.process.kill()  # SIGKILL: no shutdown save, only what the AOF holds
        server.process.wait(10)
        server.process = None
        process.communicate(timeout=300)
        rows_before = parts_rows(home, "redis_dies")[0]
        server.start()
        run_to_end(env, dataset, "redis_dies", server.url)
        check_once(home, "redis_dies", server.url, rows_before)
    finally:
        server.stop()
