"""Issue 18's GPU targets in one run of under 8 minutes, on a machine with a GPU.

On a running dask-cuda cluster whose workers preload (``scoring.preload``: torch, MLflow,
GX imported, the CUDA context and cuBLAS started before any run):

- **start-up**: the score step of a one-row-group input, the cluster's first run (the
  model loaded on the workers, the row group read, scored and written): target ≤ 3 s;
- **limit**: min(decode on all the machine's cores, GPU forward, host-to-device copy),
  each measured in this run;
- **end to end**: the score step at ``--rows`` rows on the same cluster, from the step's
  start to its last part, against that limit: target ≥ 0.8×.

The run is ``jobs.steps`` as the CLI and the DAG call them (resolve, plan, score), with
the cluster's ``tcp://`` address as ``cluster``. It prints the figures and verdicts and
writes them as JSON (``--json-out``). ``--device cpu`` rehearses the same flow without a
GPU (a LocalCluster of worker processes with the same preload, the limit without the
copy), so the script is known to run before a device is lent; its figures are not the
GPU's.

    python bench/gpu_check.py                      # on the GPU machine, ~5 min at 20M rows
    python bench/gpu_check.py --device cpu --rows 1000000   # rehearsal on a CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from bench.score_bench import (  # noqa: E402
    KEY,
    N_FEATURES,
    batchscore_run,
    compute_limit,
    dataset,
    model_dir_of,
    register_models,
)

MODEL = "mlp-64-256-256-1"
STARTUP_TARGET_S = 3.0
END_TO_END_TARGET = 0.8


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def one_row_group(cache: Path) -> Path:
    """A one-file, one-row-group input of 100,000 rows: what a run scores first."""
    from batchscore.samples import make_dataset

    folder = cache / "one-row-group"
    if not (folder / ".done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        make_dataset(
            folder,
            rows=100_000,
            files=1,
            row_group_rows=100_000,
            n_features=N_FEATURES,
            key_column=KEY,
            partitioned=False,
            seed=5,
        )
        (folder / ".done").touch()
    return folder


def decode_all_cores(folder: Path, rows: int) -> float:
    """Rows/s of Parquet → float32 matrix with a thread per core, each on its own row
    groups (Arrow's decoding and the matrix copy release the GIL)."""
    import pyarrow.parquet as pq

    from batchscore.samples import feature_names
    from scoring.model import feature_matrix

    names = tuple(feature_names(N_FEATURES))
    groups: list[tuple[Path, int, int]] = []
    for path in sorted(folder.glob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        for index in range(meta.num_row_groups):
            groups.append((path, index, meta.row_group(index).num_rows))
            if sum(g[2] for g in groups) >= rows:
                break
        if sum(g[2] for g in groups) >= rows:
            break

    def decode(group: tuple[Path, int, int]) -> int:
        path, index, count = group
        table = pq.ParquetFile(path).read_row_group(index, columns=list(names), use_threads=False)
        feature_matrix(table, names)
        return count

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        started = time.perf_counter()
        done = sum(pool.map(decode, groups))
    return done / (time.perf_counter() - started)


def copy_limit(rows: int = 1_000_000, rounds: int = 5) -> float:
    """Rows/s of 64 float32 features from a pinned host buffer to the GPU."""
    import torch

    host = torch.empty((rows, N_FEATURES), dtype=torch.float32).pin_memory()
    device = torch.empty((rows, N_FEATURES), dtype=torch.float32, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(rounds):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return rows * rounds / (time.perf_counter() - started)


def running_cluster(device: str, threads: int) -> AbstractContextManager[Any]:
    """A cluster started before the runs, as a long-lived one is, its workers preloaded."""
    if device == "cuda":
        from dask_cuda import LocalCUDACluster

        return LocalCUDACluster(  # type: ignore[no-any-return]
            threads_per_worker=threads,
            preload=["scoring.preload"],
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=1,
        threads_per_worker=threads,
        processes=True,
        preload=["scoring.preload"],
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )


def check(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folder = dataset(cache, args.rows)
    small = one_row_group(cache)
    tracking, uris = register_models(cache)
    uri = uris[MODEL]
    model_dir = model_dir_of(uri, tracking, cache)
    log(f"data and model ready in {time.perf_counter() - started:.0f} s")

    limits = {"decode_all_cores": decode_all_cores(folder, min(args.rows, 4_000_000))}
    limits["forward"] = compute_limit(model_dir, args.device, rows=2_000_000)
    if args.device == "cuda":
        limits["host_to_device"] = copy_limit()
    limit = min(limits.values())
    log(f"limits (rows/s): {json.dumps({k: round(v) for k, v in limits.items()})}")

    home = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    options = {"device": args.device, "shard_rows": args.shard_rows}
    try:
        cluster_started = time.perf_counter()
        with running_cluster(args.device, args.threads) as cluster:
            ready = time.perf_counter() - cluster_started
            address = cluster.scheduler_address
            log(f"cluster at {address} ready in {ready:.1f} s (workers preloaded)")
            first = batchscore_run(small, uri, tracking, home / "first", cluster=address, **options)
            again = batchscore_run(small, uri, tracking, home / "again", cluster=address, **options)
            log(f"start-up runs: {first['seconds']:.2f} s, then {again['seconds']:.2f} s")
            whole = batchscore_run(
                folder, uri, tracking, home / "whole", cluster=address, **options
            )
            log(f"{whole['rows']:,} rows in {whole['seconds']:.2f} s")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    rate = whole["rows_per_second"]
    return {
        "device": device_name(args.device),
        "machine": machine(),
        "rows": args.rows,
        "shard_rows": args.shard_rows,
        "threads_per_worker": args.threads,
        "cluster_ready_seconds": ready,
        "limits_rows_per_second": limits,
        "limit_rows_per_second": limit,
        "startup_first_run_seconds": first["seconds"],
        "startup_second_run_seconds": again["seconds"],
        "end_to_end": dict(whole),
        "end_to_end_vs_limit": rate / limit,
        "verdicts": {
            f"start-up to the first scored batch ≤ {STARTUP_TARGET_S:.0f} s": first["seconds"]
            <= STARTUP_TARGET_S,
            f"end to end ≥ {END_TO_END_TARGET}× the limit": rate / limit >= END_TO_END_TARGET,
        },
        "seconds": time.perf_counter() - started,
    }


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return str(torch.cuda.get_device_name(0))
    return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--shard-rows", type=int, default=500_000)
    parser.add_argument("--threads", type=int, default=4, help="threads per worker")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--cache", default=str(REPO / ".bench-data" / "score"))
    parser.add_argument("--json-out", default="gpu_check.json")
    args = parser.parse_args()
    results = check(args)
    text = json.dumps(results, indent=2, default=str, ensure_ascii=False)
    print(text)
    Path(args.json_out).write_text(text)


if __name__ == "__main__":
    main()
