"""Scoring from an S3-compatible server against scoring the same files on local disk.

Measured side by side in one run, on one dataset and one model (bench/score_bench.py's):

- batchscore's score step (plan, then score with the default in-process cluster, parts
  written to a local run folder) with the input on local disk, and with the same files
  as objects of an S3 server on loopback, reached through ``AWS_ENDPOINT_URL`` and keys
  as a user reaches it;
- the read limit of each source: the key and feature columns of every row group read
  with pyarrow alone (local file / ranged GETs), no model;
- from S3 with the default prefetch (2 row groups ahead for object-store input) and with
  none, as on local disk.

The S3 server (``--server``): SeaweedFS by default, a Go server (``weed server``: master,
volume server, filer and S3 gateway in one process; the ``weed`` binary of the pyproject
``bench`` extra, which ``make bench-s3`` installs), fast enough that the figure measures
batchscore rather than the server; or moto's server mode (``tests/s3.py``, what the tests
use), a Python server whose own read rate on 2 cores is far below local disk's. Both
check every request's signature against the one access key they issued.

Rounds are interleaved; each contender keeps its best round. Target: the score step
from S3 at ≥ 0.8× the same step from local disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, table, write_section  # noqa: E402
from bench.score_bench import (  # noqa: E402
    KEY,
    MODELS,
    N_FEATURES,
    batchscore_run,
    dataset,
    register_models,
)

TITLE = "Scoring from an object store (bench/s3_bench.py)"
MODEL = "mlp-64-256-256-1"
BUCKET = "bench"
LOCAL = "local disk"
REGION = "us-east-1"
SERVERS = ("seaweedfs", "moto")


def log(message: str) -> None:
    print(f"[bench-s3 {time.strftime('%H:%M:%S')}] {message}", flush=True)


class BenchServer(Protocol):
    """An S3 server on loopback for one bench run; ``stop`` ends its process."""

    label: str  # the server and its version, for the table
    about: str  # a sentence for the docs: what the server is and how it was reached

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def pid(self) -> int: ...
    def client(self) -> Any: ...
    def user_env(self, home: Path) -> dict[str, str]: ...


def weed_binary() -> str | None:
    """The ``weed`` of this venv (the ``bench`` extra), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def aws_env(endpoint: str, key_id: str, secret: str, home: Path) -> dict[str, str]:
    """The AWS variables of a user who reaches ``endpoint`` with one key; the shared config
    and credentials files point into ``home``, so the machine's own ~/.aws takes no part."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
    }


class SeaweedFS:
    """``weed server`` with a filer and its S3 gateway, every port a free one on 127.0.0.1,
    its data in ``folder``, and one identity whose key must sign every S3 request (an
    unsigned or wrongly signed one is refused: SeaweedFS turns authentication on as soon
    as its S3 config names an identity)."""

    PORTS = ("master", "volume", "filer", "s3")

    def __init__(self, binary: str, folder: Path) -> None:
        from batchscore.testing import free_port

        self.binary = binary
        self.folder = folder
        self.ports = {name + tail: free_port() for name in self.PORTS for tail in ("", ".grpc")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.log = folder / "weed.log"
        self.key_id = "bench" + secrets.token_hex(8)
        self.secret = secrets.token_urlsafe(30)
        self.process: subprocess.Popen[bytes] | None = None
        version = subprocess.run(
            [binary, "version"], capture_output=True, text=True, check=True
        ).stdout
        found = re.search(r"\b(\d+\.\d+(?:\.\d+)?)\b", version)
        self.label = f"SeaweedFS {found.group(1) if found else version.strip()}"
        self.about = (
            f"The S3 server is {self.label} (`weed server`: master, volume server, filer and "
            "S3 gateway in one Go process, the `weed` binary of the pyproject `bench` extra) "
            "on loopback with its own data folder, reached through `AWS_ENDPOINT_URL` and "
            "the one access key it was configured with (it refuses unsigned and wrongly "
            "signed requests); the same files, uploaded once."
        )

    def command(self) -> list[str]:
        config = self.folder / "s3.json"
        identity = {
            "name": "bench",
            "credentials": [{"accessKey": self.key_id, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = [f"-{name}.port{tail}={self.ports[name + tail]}"
                 for name in self.PORTS for tail in ("", ".grpc")]  # fmt: skip
        return [
            self.binary, "server", f"-dir={self.folder / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3", *ports,
            f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=1024",
            "-volume.preStopSeconds=0",
        ]  # fmt: skip

    def start(self, seconds: float = 90) -> None:
        from batchscore.testing import wait_until

        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        s3 = self.client()

        def answers() -> bool:
            try:
                s3.list_buckets()
            except Exception:  # noqa: BLE001 - not up yet: refused, or the filer not ready
                return False
            return True

        wait_until(answers, what=self.label, seconds=seconds, process=self.process, log=self.log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def user_env(self, home: Path) -> dict[str, str]:
        return aws_env(self.endpoint, self.key_id, self.secret, home)


class Moto:
    """moto's server mode as the tests run it (``tests/s3.py``): an IAM user's key, then
    request authentication on."""

    def __init__(self, folder: Path) -> None:
        from importlib.metadata import version

        from tests.s3 import S3Server

        self.server = S3Server(folder)
        self.label = f"moto {version('moto')}"
        self.about = (
            f"The S3 server is {self.label} in server mode on loopback (`tests/s3.py`, "
            "request authentication on), a Python server, reached through "
            "`AWS_ENDPOINT_URL` and an access key; the same files, uploaded once."
        )

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def client(self) -> Any:
        return self.server.client()

    def user_env(self, home: Path) -> dict[str, str]:
        key = self.server.user("bench")
        self.server.authenticate()
        return self.server.env(key, home)


def make_server(name: str, folder: Path) -> BenchServer:
    if name == "moto":
        return Moto(folder)
    binary = weed_binary()
    if binary is None:
        raise SystemExit(
            "bench/s3_bench.py --server seaweedfs: no `weed` binary in this venv or on PATH; "
            "install the bench extra (make bench-s3 does: pip install -e '.[bench]') or "
            "run with --server moto"
        )
    return SeaweedFS(binary, folder)


def upload_folder(client: Any, folder: Path, bucket: str, prefix: str) -> None:
    """Every file under ``folder`` to ``s3://bucket/prefix/...``, relative paths kept."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
        client.upload_file(str(path), bucket, key)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far: the S3 server's share of the cores."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def read_limit(source: str, rows: int) -> float:
    """Rows/s of reading the key and feature columns of every row group, nothing else."""
    from batchscore.core import storage
    from batchscore.samples import feature_names
    from scoring.inputs import discover

    columns = [KEY, *feature_names(N_FEATURES)]
    done = 0
    started = time.perf_counter()
    for found in discover(source):
        reader = storage.open_parquet(found.path)
        for index in range(reader.num_row_groups):
            done += reader.read_row_group(index, columns=columns).num_rows
        if done >= rows:
            break
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-rows", type=int, default=500_000)
    parser.add_argument("--cache", default=str(REPO / ".bench-data" / "score"))
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default=None,
        help="the S3 server: seaweedfs (the default where its `weed` binary is installed) "
        "or moto (tests/s3.py's)",
    )
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    if args.server is None:
        args.server = "seaweedfs" if weed_binary() else "moto"
        if args.server == "moto":
            log("no `weed` binary (the bench extra; make bench-s3 installs it): using moto")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    from tests.s3 import AWS_VARIABLES

    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    cache = Path(args.cache)
    folder = dataset(cache, args.rows)
    tracking, uris = register_models(cache)
    assert MODEL in MODELS
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = make_server(args.server, work / "s3")
    remote_name = f"S3: {server.label} (loopback)"
    server.start()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        log(f"uploading {args.rows:,} rows to {server.label}")
        upload_folder(server.client(), folder.resolve(), BUCKET, "data")
        for name in AWS_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(server.user_env(work / "aws"))
        remote = f"s3://{BUCKET}/data/"
        sources = {  # name: (input, prefetch_row_groups; None: the default)
            LOCAL: (str(folder), None),
            remote_name: (remote, None),
            f"{remote_name}, no prefetch": (remote, 0),
        }
        runs: dict[str, list[float]] = {name: [] for name in sources}
        server_cpu: dict[str, list[float]] = {name: [] for name in sources}
        limits: dict[str, float] = {name: 0.0 for name in sources}
        for round_ in range(args.rounds):
            for name, (source, prefetch) in sources.items():
                limits[name] = max(limits[name], read_limit(source, args.rows))
                cpu_before = cpu_seconds(server.pid())
                run = batchscore_run(
                    source,  # type: ignore[arg-type]  # a path or a URL, as --input takes
                    uris[MODEL],
                    tracking,
                    work / "home",
                    shard_rows=args.shard_rows,
                    prefetch_row_groups=prefetch,
                )
                server_cpu[name].append(cpu_seconds(server.pid()) - cpu_before)
                assert run["rows"] == args.rows, run
                runs[name].append(run["seconds"])
                log(
                    f"round {round_ + 1}, {name}: {run['seconds']:.2f} s, "
                    f"server CPU {server_cpu[name][-1]:.2f} s"
                )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    load = (load_before, os.getloadavg()[0])
    result = Result(args, server, remote_name, runs, server_cpu, limits, load)
    body = render(result, time.perf_counter() - began)
    if args.no_docs:
        print(body)
    else:
        write_section(TITLE, body)
        print(body)


class Result:
    """One bench run's figures: each source's rounds, its best, and the S3 server's CPU."""

    def __init__(
        self,
        args: argparse.Namespace,
        server: BenchServer,
        remote: str,
        runs: dict[str, list[float]],
        server_cpu: dict[str, list[float]],
        limits: dict[str, float],
        load: tuple[float, float],
    ) -> None:
        self.args, self.server, self.remote = args, server, remote
        self.runs, self.server_cpu, self.limits = runs, server_cpu, limits
        self.best = {name: args.rows / min(seconds) for name, seconds in runs.items()}
        self.ratio = self.best[remote] / self.best[LOCAL]
        self.load = load  # the 1-minute load average at the bench's start and end

    def best_cpu(self, name: str) -> float:
        """The server's CPU seconds in ``name``'s best (fastest) round."""
        seconds = self.runs[name]
        return self.server_cpu[name][seconds.index(min(seconds))]


def render(result: Result, seconds: float) -> str:
    args, runs, limits, best = result.args, result.runs, result.limits, result.best
    remote = result.remote
    command = f"python bench/s3_bench.py --rows {args.rows} --rounds {args.rounds}" + (
        f" --server {args.server}" if args.server != SERVERS[0] else ""
    )
    rows = [
        [name, f"{args.rows:,}", f"{limits[name]:,.0f}", f"{best[name]:,.0f}",
         ", ".join(f"{s:.2f}" for s in runs[name]),
         "—" if name == LOCAL else f"{result.best_cpu(name):.2f}"]
        for name in runs
    ]  # fmt: skip
    verdict = "met" if result.ratio >= 0.8 else "NOT met"
    best_seconds = min(runs[remote])
    cpu = result.best_cpu(remote)
    return "\n\n".join(
        [
            f"Command: `{command}` (`make bench-s3`), {time.strftime('%Y-%m-%d')}, "
            f"{machine()}; the whole bench took {seconds:.0f} s. Dataset: "
            f"bench/score_bench.py's ({N_FEATURES} float32 features and an int64 key, "
            f"500,000-row files of 100,000-row row groups), model {MODEL}. batchscore: the "
            "score step (plan, then score with the default in-process cluster, shards of "
            f"{args.shard_rows:,} rows, per-part checks on, parts to a local run folder), a "
            f"fresh home per run. {result.server.about} Read limit: the key and feature "
            "columns of every row group read with pyarrow alone (local files, or ranged GETs "
            "through `batchscore.core.storage`). Prefetch: by default a worker reads 2 row "
            "groups ahead of the forward pass when its input is on an object store (none "
            "for local files on CPU); the last row turns it off. The S3 server runs on the "
            "same 2 cores as the scoring: its CPU during each score step is in the last "
            f"column. {args.rounds} interleaved rounds; each source shows its best. "
            "`--server moto` runs the same comparison against the tests' moto server.",
            table(
                [
                    "input",
                    "rows",
                    "read limit rows/s",
                    "score step rows/s",
                    "score step seconds, in round order",
                    "S3 server CPU s (best round)",
                ],
                rows,
            ),  # fmt: skip
            table(
                ["target", "ratio", "verdict"],
                [
                    ["score step from S3 ≥ 0.8× from local disk", f"{result.ratio:.2f}×", verdict],
                    [
                        "(for reading: score step from S3 ÷ the S3 server's read limit)",
                        f"{best[remote] / limits[remote]:.2f}×",
                        "—",
                    ],
                ],
            ),
            f"{result.server.label} delivers {limits[remote]:,.0f} rows/s of these columns "
            f"to a reader that does nothing else ({limits[remote] / limits[LOCAL]:.2f}× the "
            f"local files' read limit, {limits[remote] / best[LOCAL]:.1f}× the rate at which "
            f"the score step consumes rows from local disk). In the best S3 round it used "
            f"{cpu:.1f} s of CPU in the step's {best_seconds:.1f} s "
            f"({cpu / best_seconds / 2:.0%} of the 2 cores), taken from the scoring. "
            + (
                "moto is a Python server: the score step from S3 is bound by its read rate "
                "here, and the ratio says little about a real S3 or MinIO endpoint. "
                if args.server == "moto"
                else "Against a remote endpoint that CPU is off the scoring machine, while "
                "the network adds latency that loopback does not show. "
            )
            + "Other work may have shared the cores (the sources ran interleaved): the 1-minute "
            f"load average was {result.load[0]:.1f} at the bench's start and {result.load[1]:.1f} "
            "at its end.",
        ]
    )


if __name__ == "__main__":
    main()
