"""A multi-host rehearsal on one machine: nothing may depend on a path shared by accident.

The Dask scheduler, two Dask workers, the driver (``batchscore run``) and the lookup API
each run as a "host": a working folder of its own as its current directory, ``HOME``,
``TMPDIR`` and ``BATCHSCORE_HOME``, and a mount namespace of its own (``unshare
--mount``) in which every other host's folder, the test dataset's folder and (but for the
driver) the MLflow registry's are covered by an empty tmpfs. A file one host writes where
another expects it stays in the writer's view only, as on separate machines. What they
share is what separate machines share: the object store (moto's S3 server), the Redis
Cluster, and the network (loopback: one network namespace; the services listen there).

The run reads its input from ``s3://``, writes its run folder there, scores on the two
workers (they fetch the model from the run folder), keeps the per-part check results
beside the parts, exports to the cluster (from the driver, or, with
``BATCHSCORE_EXPORT_ON_WORKERS``, each worker its own parts) and publishes; the driver's
Data Docs and MLflow record are on the driver. The API answers from the cluster, then, with the
cluster gone, from the run's parts on the object store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest

from batchscore.testing import RedisClusterServers, free_port, wait_for_http, wait_until
from jobs.manifest import load_manifest
from scoring.engine import worker_process_env
from tests.conftest import BIN, KEY, REPO, Registry, direct_forward, read_rows
from tests.s3 import AWS_VARIABLES, S3Server

pytestmark = [pytest.mark.s3, pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]
BUCKET = "lake"
RUNS = f"s3://{BUCKET}/runs"
NAMESPACE = "rehearsal"
SAMPLE = [1_000_000, 1_003_333, 1_007_001, 1_011_999]

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None
    or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0,
    reason="needs unshare --mount (util-linux, and the right to make mount namespaces)",
)


class Host:
    """A folder that a process sees as its machine's; ``hidden`` covers other folders."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.folder = root / name
        (self.folder / "tmp").mkdir(parents=True)
        self.hidden: list[Path] = []

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return base | {
            "HOME": str(self.folder),
            "TMPDIR": str(self.folder / "tmp"),
            "BATCHSCORE_HOME": str(self.folder / "batchscore"),
        }

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` in a mount namespace of its own with ``hidden`` covered."""
        covers = " && ".join(f"mount -t tmpfs -o size=1m tmpfs '{p}'" for p in self.hidden)
        script = f'{covers + " && " if covers else ""}exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]

    def start(self, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{self.name}.log").open("ab")
        return subprocess.Popen(
            self.command(argv),
            cwd=self.folder,
            env=self.env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        path = self.folder / f"{self.name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def clean_environment() -> dict[str, str]:
    """The machine's environment less every setting of batchscore, MLflow and AWS."""
    drop = ("BATCHSCORE_", "MLFLOW_", "DASK_")
    kept = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(drop) and k not in AWS_VARIABLES and k != "PYTHONPATH"
    }
    return kept | {"PYTHONPATH": str(REPO)}  # the test models' classes, from the repository


@pytest.fixture
def s3(tmp_path: Path, dataset: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path / "s3-server")
    server.start()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        server.upload_folder(dataset, BUCKET, "churn")
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path / "redis-cluster")
    cluster.start()
    yield cluster
    cluster.stop()


@needs_unshare
@pytest.mark.parametrize(
    "export_on_workers", [False, True], ids=["driver-exports", "workers-export"]
)
def test_scheduler_workers_driver_and_api_share_only_the_object_store_and_redis(
    export_on_workers: bool,
    registry: Registry,
    dataset: Path,
    tmp_path: Path,
    s3: S3Server,
    own_cluster: RedisClusterServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    team = s3.user("scoring")
    s3.authenticate()
    root = tmp_path / "hosts"
    hosts = {n: Host(root, n) for n in ("scheduler", "worker-a", "worker-b", "driver", "api")}
    registry_folder = Path(registry.tracking_uri.removeprefix("sqlite:///")).parent
    for host in hosts.values():
        host.hidden = [h.folder for h in hosts.values() if h is not host] + [dataset]
        if host.name != "driver":
            host.hidden.append(registry_folder)
    base = clean_environment()
    aws = {n: s3.env(team, h.folder / "aws") for n, h in hosts.items()}
    processes: list[subprocess.Popen[bytes]] = []
    port = free_port()
    scheduler = f"tcp://127.0.0.1:{port}"
    try:
        processes.append(
            hosts["scheduler"].start(
                [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                 "--dashboard-address", ":0"],
                base,
            )
        )  # fmt: skip
        for name in ("worker-a", "worker-b"):
            processes.append(
                hosts[name].start(
                    [str(BIN / "dask"), "worker", scheduler, "--name", name, "--nworkers", "1",
                     "--nthreads", "1", "--dashboard-address", ":0",
                     "--local-directory", str(hosts[name].folder / "dask"),
                     "--preload", "scoring.preload"],
                    base | worker_process_env() | aws[name],
                )
            )  # fmt: skip
        wait_for_workers(scheduler, 2, hosts)

        driver = hosts["driver"]
        summary_path = driver.folder / "summary.json"
        run = subprocess.run(
            driver.command(
                [str(BIN / "batchscore"), "run", "--input", f"s3://{BUCKET}/churn/",
                 "--model", "models:/churn/1", "--key-column", KEY, "--namespace", NAMESPACE,
                 "--cluster", scheduler, "--output", RUNS, "--store", own_cluster.url,
                 "--summary-json", str(summary_path)]
            ),
            cwd=driver.folder,
            env=driver.env(
                base
                | aws["driver"]
                | {
                    "MLFLOW_TRACKING_URI": registry.tracking_uri,
                    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",
                    "BATCHSCORE_SHARD_ROWS": "2000",
                    "BATCHSCORE_EXPORT_ON_WORKERS": str(export_on_workers).lower(),
                }
            ),
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-4000:] + hosts["worker-a"].log()
        summary = json.loads(summary_path.read_text())
        assert summary["published"] is True and summary["rows"] == 12_000
        assert summary["run_dir"].startswith(f"{RUNS}/{NAMESPACE}/run-")

        # The run folder is on the object store: read it from here as any host would.
        for name, value in aws["driver"].items():
            monkeypatch.setenv(name, value)
        manifest = load_manifest(summary["run_dir"])
        scored_on = {s.worker for s in manifest.shards}
        assert len(manifest.shards) == 6 and len(scored_on) == 2, scored_on
        assert all(s.part.startswith(summary["run_dir"]) for s in manifest.shards)
        validate = manifest.steps["validate"]
        # The workers' per-part results were found by the driver: beside the parts.
        assert (validate["parts_reused"], validate["parts_rechecked"]) == (6, 0), validate
        loaded_on = manifest.steps["export"]["loaded_on"]
        assert loaded_on == (["worker-a", "worker-b"] if export_on_workers else "this process")
        # Data Docs and the MLflow record are the driver's own.
        docs = Path(manifest.reports["data_docs"])
        assert docs.is_relative_to(driver.folder) and docs.is_file()
        assert "could not record" not in run.stderr, run.stderr[-4000:]
        # No host holds a Parquet file: input and parts live on the object store only.
        assert not [p for h in hosts.values() for p in h.folder.rglob("*.parquet")]

        api = hosts["api"]
        api_port = free_port()
        processes.append(
            api.start(
                [str(BIN / "batchscore"), "serve", "--store", own_cluster.url,
                 "--port", str(api_port)],
                base | aws["api"] | {"BATCHSCORE_STORE_TIMEOUT_SECONDS": "0.3"},
            )
        )  # fmt: skip
        base_url = f"http://127.0.0.1:{api_port}"
        wait_for_http(f"{base_url}/healthz", seconds=60, process=processes[-1])
        rows = read_rows(dataset, SAMPLE)
        truth = direct_forward(
            registry.tracking_uri, "models:/churn/1", np.stack([rows[k] for k in SAMPLE])
        )

        def lookups() -> list[httpx.Response]:
            return [httpx.get(f"{base_url}/v1/predictions/{NAMESPACE}/{k}") for k in SAMPLE]

        answers = lookups()
        assert [a.json().get("source") for a in answers] == ["kv"] * len(SAMPLE), answers[0].text
        got = [a.json()["prediction"]["churn_probability"] for a in answers]
        assert got == pytest.approx([float(v) for v in truth[:, 0]], rel=1e-5)

        # The cluster goes away: the API answers from the run's parts on the object store.
        own_cluster.stop()

        def from_the_parts() -> bool:
            found = lookups()
            return all(a.status_code == 200 and a.json()["source"] == "batch" for a in found)

        wait_until(from_the_parts, seconds=60, what="answers from the batch fallback")
        again = [a.json()["prediction"]["churn_probability"] for a in lookups()]
        assert again == pytest.approx(got)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_workers(scheduler: str, count: int, hosts: dict[str, Host]) -> None:
    from distributed import Client

    with Client(scheduler, timeout=120) as client:
        try:
            client.wait_for_workers(count, timeout=120)
        except TimeoutError as exc:
            logs = "\n".join(f"{n}: {h.log()}" for n, h in hosts.items())
            raise AssertionError(f"{count} workers did not join {scheduler}:\n{logs}") from exc
