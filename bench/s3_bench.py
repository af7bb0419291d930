"""Scoring from an S3-compatible server against scoring the same files on local disk.

Measured side by side in one run, on one dataset and one model (bench/score_bench.py's):

- batchscore's score step (plan, then score with the default in-process cluster, parts
  written to a local run folder) with the input on local disk, and with the same files
  as objects of an S3 server on loopback (moto's server mode, ``tests/s3.py``, request
  authentication on), reached through ``AWS_ENDPOINT_URL`` and keys as a user reaches it;
- the read limit of each source: the key and feature columns of every row group read
  with pyarrow alone (local file / ranged GETs), no model;
- from S3 with the default prefetch (2 row groups ahead for object-store input) and with
  none, as on local disk.

Rounds are interleaved; each contender keeps its best round. Target: the score step
from S3 at ≥ 0.8× the same step from local disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

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
REMOTE = "S3 server (loopback)"


def log(message: str) -> None:
    print(f"[bench-s3 {time.strftime('%H:%M:%S')}] {message}", flush=True)


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
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    from tests.s3 import AWS_VARIABLES, S3Server

    began = time.perf_counter()
    cache = Path(args.cache)
    folder = dataset(cache, args.rows)
    tracking, uris = register_models(cache)
    assert MODEL in MODELS
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = S3Server(work / "s3")
    server.start()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        log(f"uploading {args.rows:,} rows to the S3 server")
        server.upload_folder(folder.resolve(), BUCKET, "data")
        key = server.user("bench")
        server.authenticate()
        for name in AWS_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(server.env(key, work / "aws"))
        remote = f"s3://{BUCKET}/data/"
        sources = {  # name: (input, prefetch_row_groups; None: the default)
            LOCAL: (str(folder), None),
            REMOTE: (remote, None),
            f"{REMOTE}, no prefetch": (remote, 0),
        }
        runs: dict[str, list[float]] = {name: [] for name in sources}
        limits: dict[str, float] = {name: 0.0 for name in sources}
        for round_ in range(args.rounds):
            for name, (source, prefetch) in sources.items():
                limits[name] = max(limits[name], read_limit(source, args.rows))
                run = batchscore_run(
                    source,  # type: ignore[arg-type]  # a path or a URL, as --input takes
                    uris[MODEL],
                    tracking,
                    work / "home",
                    shard_rows=args.shard_rows,
                    prefetch_row_groups=prefetch,
                )
                assert run["rows"] == args.rows, run
                runs[name].append(run["seconds"])
                log(f"round {round_ + 1}, {name}: {run['seconds']:.2f} s")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    best = {name: args.rows / min(seconds) for name, seconds in runs.items()}
    ratio = best[REMOTE] / best[LOCAL]
    body = render(args, runs, best, limits, ratio, time.perf_counter() - began)
    if args.no_docs:
        print(body)
    else:
        write_section(TITLE, body)
        print(body)


def render(
    args: argparse.Namespace,
    runs: dict[str, list[float]],
    best: dict[str, float],
    limits: dict[str, float],
    ratio: float,
    seconds: float,
) -> str:
    command = f"python bench/s3_bench.py --rows {args.rows} --rounds {args.rounds}"
    rows = [
        [name, f"{args.rows:,}", f"{limits[name]:,.0f}", f"{best[name]:,.0f}",
         ", ".join(f"{s:.2f}" for s in runs[name])]
        for name in runs
    ]  # fmt: skip
    verdict = "met" if ratio >= 0.8 else "NOT met"
    return "\n\n".join(
        [
            f"Command: `{command}`, {time.strftime('%Y-%m-%d')}, {machine()}; the whole bench "
            f"took {seconds:.0f} s. Dataset: bench/score_bench.py's ({N_FEATURES} float32 "
            "features and an int64 key, 500,000-row files of 100,000-row row groups), model "
            f"{MODEL}. batchscore: the score step (plan, then score with the default "
            f"in-process cluster, shards of {args.shard_rows:,} rows, per-part checks on, "
            "parts to a local run folder), a fresh home per run. The S3 server is moto in "
            "server mode on loopback (`tests/s3.py`, request authentication on), reached "
            "through `AWS_ENDPOINT_URL` and an access key; the same files, uploaded once. "
            "Read limit: the key and feature columns of every row group read with pyarrow "
            "alone (local files, or ranged GETs through `batchscore.core.storage`). "
            "Prefetch: by default a worker reads 2 row groups ahead of the forward pass "
            "when its input is on an object store (none for local files on CPU); the last "
            "row turns it off. The S3 server runs on the same cores as the scoring, so its "
            "own CPU (a Python server) is part of every S3 figure. "
            f"{args.rounds} interleaved rounds; each source shows its best.",
            table(
                [
                    "input",
                    "rows",
                    "read limit rows/s",
                    "score step rows/s",
                    "score step seconds, in round order",
                ],
                rows,
            ),  # fmt: skip
            table(
                ["target", "ratio", "verdict"],
                [
                    ["score step from S3 ≥ 0.8× from local disk", f"{ratio:.2f}×", verdict],
                    [
                        "(for reading: score step from S3 ÷ the S3 server's read limit)",
                        f"{best[REMOTE] / limits[REMOTE]:.2f}×",
                        "—",
                    ],
                ],
            ),
            f"The S3 server of this bench delivers {limits[REMOTE]:,.0f} rows/s of these "
            f"columns to a reader that does nothing else ({limits[REMOTE] / limits[LOCAL]:.2f}× "
            "the local files' read limit): moto is a Python server, and it shares the 2 cores "
            "with the scoring. The score step from S3 is bound by that server here; the ratio "
            "to local disk says little about an S3 or MinIO endpoint on other hardware, which "
            "this machine cannot reach. Other work may have shared the cores (the sources "
            "ran interleaved).",
        ]
    )


if __name__ == "__main__":
    main()
