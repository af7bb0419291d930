"""make bench-score, first part: the default path at every size, fixed costs apart.

What a new user runs: ``batchscore run`` with no running cluster (the default, ``local``),
a fresh process per run, against what they would write instead — a plain loop of
``mlflow.pyfunc.load_model(...)`` then ``.predict(pd.read_parquet(f))`` per file, itself
run as a fresh Python process. Measured side by side in interleaved rounds at each size
(200k, 2M, 20M rows by default), each contender keeping its best round:

- the whole run: wall clock from process start to exit, both sides;
- the score step against the serial limit ``rows ÷ (decode time + forward time)``, both
  measured in this process in the same round, and against the loop's load + predict time;
- validation: the per-part checks (their share of the score step: the same step with
  ``check_parts_in_score`` off, in the same round) plus the validate step, plus what the
  run waited for its Data Docs (built by a process of their own meanwhile, their own
  time shown apart);
- the ``batchscore`` DAG under ``airflow standalone`` (``--dag``) at the smaller sizes,
  wall clock from the trigger to the run's end as Airflow records it (not to the poll
  that sees it), and its tasks' durations;
- fixed and per-row cost of each step, from a least-squares line over the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, table, write_section  # noqa: E402
from bench.score_bench import (  # noqa: E402
    FILE_ROWS,
    KEY,
    N_FEATURES,
    ROW_GROUP_ROWS,
    compute_limit,
    dataset,
    decode_limit,
    model_dir_of,
    register_models,
)

BIN = Path(sys.executable).parent
MODEL = "mlp-64-256-256-1"
STEPS = ("resolve", "plan", "score", "validate", "drift", "export", "publish")
# DAG tasks that run beside the chain resolve → … → publish, not on it
BESIDE_THE_CHAIN = ("reports",)
TITLE = "Default path at every size (make bench-score)"

LOOP = """
import json, time
started = time.perf_counter()
import numpy as np, pandas as pd, mlflow.pyfunc
from pathlib import Path
imported = time.perf_counter()
names = [f"f{{i:02d}}" for i in range({n})]
model = mlflow.pyfunc.load_model("{uri}")
out = Path("{out}")
for path in sorted(Path("{folder}").glob("*.parquet")):
    frame = pd.read_parquet(path, columns=["{key}", *names])
    scores = np.asarray(model.predict(frame[names])).reshape(len(frame), -1)
    pd.DataFrame({{"{key}": frame["{key}"], "score": scores[:, 0]}}).to_parquet(out / path.name)
print(json.dumps({{"imports": imported - started, "work": time.perf_counter() - imported}}))
"""


def log(message: str) -> None:
    print(f"[bench-default {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sized_dataset(cache: Path, rows: int) -> Path:
    """A folder of exactly ``rows`` rows: links to the shared 500,000-row files when
    ``rows`` is a multiple of them, else four files of its own (written once)."""
    from batchscore.samples import make_dataset

    target = cache / f"default-{rows}"
    if rows % FILE_ROWS == 0:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(dataset(cache, rows), target, symlinks=True)  # dataset() reuses its folder
        return target
    marker = cache / f"default-{rows}.done"
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)
        make_dataset(
            target,
            rows=rows,
            files=4,
            row_group_rows=min(ROW_GROUP_ROWS, rows // 8 or 1),
            n_features=N_FEATURES,
            key_column=KEY,
            partitioned=False,
            seed=13,
        )
        marker.touch()
    return target


def clean_env(tracking: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHSCORE_", "MLFLOW_"))}
    return env | {
        "BATCHSCORE_HOME": str(home),
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GX_ANALYTICS_ENABLED": "false",
    }


def cli_run(folder: Path, uri: str, tracking: str, scratch: Path, **extra: str) -> dict[str, Any]:
    """``batchscore run`` as a fresh process on a fresh home: wall clock and step seconds."""
    home = scratch / "home"
    shutil.rmtree(home, ignore_errors=True)
    summary = scratch / "summary.json"
    env = clean_env(tracking, home) | extra
    command = [str(BIN / "batchscore"), "run", "--input", str(folder), "--model", uri]
    command += ["--key-column", KEY, "--namespace", "bench", "--summary-json", str(summary)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"batchscore run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    found = json.loads(summary.read_text())
    steps = {s: float(found["steps"].get(s, {}).get("seconds") or 0.0) for s in STEPS}
    validate = found["steps"].get("validate", {})
    return {
        "wall": wall,
        "steps": steps,
        "rows": int(found["rows"]),
        "part_check_seconds": float(validate.get("part_check_seconds") or 0.0),
        "docs_seconds": float(validate.get("docs_seconds") or 0.0),
        # The Data Docs are built by a process of their own while the drift gate and the
        # export run (jobs.data_docs); what the run waited for them is on its critical path.
        "docs_waited_seconds": float(validate.get("docs_waited_seconds") or 0.0),
    }


def loop_run(folder: Path, uri: str, tracking: str, scratch: Path) -> dict[str, float]:
    """The plain pyfunc loop as a fresh Python process: wall clock, and its own split."""
    out = scratch / "loop-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    code = LOOP.format(n=N_FEATURES, uri=uri, out=out, folder=folder, key=KEY)
    env = clean_env(tracking, scratch / "loop-home")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the plain loop failed:\n{done.stderr[-4000:]}")
    inner = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall": wall, "work": float(inner["work"])}


def serial_limit(folder: Path, model_dir: Path, rows: int) -> float:
    """Rows/s of decode then forward, one after the other, measured now."""
    decode = decode_limit(folder, min(rows, 2_000_000))
    forward = compute_limit(model_dir, "cpu", rows=min(rows, 1_000_000))
    return 1 / (1 / decode + 1 / forward)


def keep_best(best: dict[str, dict[str, Any]], name: str, found: dict[str, Any]) -> None:
    if name not in best or found["wall"] < best[name]["wall"]:
        best[name] = found


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line seconds = fixed + per_row × rows; (fixed, per-row)."""
    n = len(points)
    if n < 2:
        return points[0][1], 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def bench(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folders = {size: sized_dataset(cache, size) for size in sorted(args.sizes)}
    tracking, uris = register_models(cache)
    uri = uris[MODEL]
    model_dir = model_dir_of(uri, tracking, cache)
    scratch = Path(tempfile.mkdtemp(prefix="bench-default-"))
    best: dict[str, dict[str, Any]] = {}
    limits: dict[int, float] = {}
    try:
        for round_ in range(1, args.rounds + 1):
            for size, folder in folders.items():
                decode_limit(folder, min(size, 2_000_000))  # page cache warm for both sides
                rate = serial_limit(folder, model_dir, size)
                limits[size] = max(limits.get(size, 0.0), rate)
                order = ["cli", "loop", "nochecks"] if round_ % 2 else ["nochecks", "loop", "cli"]
                for who in order:
                    if who == "nochecks" and size > args.validation_max_rows:
                        continue  # the validation target is at 2M rows; 20M would triple
                    log(f"round {round_}: {who} at {size:,} rows")
                    if who == "cli":
                        keep_best(best, f"cli-{size}", cli_run(folder, uri, tracking, scratch))
                    elif who == "nochecks":
                        found = cli_run(
                            folder,
                            uri,
                            tracking,
                            scratch,
                            BATCHSCORE_CHECK_PARTS_IN_SCORE="false",
                        )
                        keep_best(best, f"nochecks-{size}", found)
                    else:
                        keep_best(best, f"loop-{size}", loop_run(folder, uri, tracking, scratch))
        if args.dag:
            dag_rounds(args, folders, uri, tracking, scratch, best)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"best": best, "limits": limits, "sizes": sorted(args.sizes), "rounds": args.rounds}


def dag_rounds(
    args: argparse.Namespace,
    folders: dict[int, Path],
    uri: str,
    tracking: str,
    scratch: Path,
    best: dict[str, dict[str, Any]],
) -> None:
    """The DAG under ``airflow standalone``, after the other rounds: an idle scheduler and
    DAG processor take CPU, so Airflow runs only now. Each round runs the CLI beside the
    DAG at the same size, so the DAG ÷ CLI ratio compares runs under the same load."""
    dag = DagBench(tracking, scratch)
    try:
        for round_ in range(1, args.rounds + 1):
            for size in args.dag_sizes:
                folder = folders[size]
                log(f"DAG round {round_}: DAG and CLI at {size:,} rows")
                keep_best(best, f"dag-{size}", dag.run(folder, uri, size))
                found = cli_run(folder, uri, tracking, scratch)
                keep_best(best, f"cli-beside-dag-{size}", found)
    finally:
        dag.stop()


class DagBench:
    """``airflow standalone`` (tests/airflow_server.py), started once for every DAG run."""

    def __init__(self, tracking: str, scratch: Path) -> None:
        from tests.airflow_server import start_airflow

        home = scratch / "airflow"
        home.mkdir()
        self.runs_home = scratch / "dag-home"
        env = clean_env(tracking, self.runs_home)
        run_env = {k: v for k, v in env.items() if k.startswith(("BATCHSCORE_", "MLFLOW_", "GX_"))}
        log("starting airflow standalone")
        self.server = start_airflow(home, run_env)
        self.server.wait_for_dag("batchscore")
        self.server.unpause("batchscore")
        self.count = 0

    def run(self, folder: Path, uri: str, size: int) -> dict[str, Any]:
        self.count += 1
        conf = {
            "input_path": str(folder),
            "model_uri": uri,
            "key_column": KEY,
            "namespace": f"dag{self.count}",
        }
        triggered = time.time()
        run_id = self.server.trigger("batchscore", conf)
        self.server.wait_for_run("batchscore", run_id, timeout=3600)
        # The run's own end as Airflow recorded it, not the poll that saw it (every 3 s)
        answer = self.server.api("GET", f"/dags/batchscore/dagRuns/{run_id}")
        ended = datetime.fromisoformat(answer.json()["end_date"].replace("Z", "+00:00"))
        wall = ended.timestamp() - triggered
        tasks = {}
        for task in self.server.task_instances("batchscore", run_id):
            if task.get("duration") is not None:
                tasks[str(task["task_id"])] = float(task["duration"])
        return {"wall": wall, "tasks": tasks, "rows": size}

    def stop(self) -> None:
        self.server.stop()


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference else "n/a"


def render(results: dict[str, Any], args: argparse.Namespace, seconds: float) -> str:
    best, limits = results["best"], results["limits"]
    sizes = results["sizes"]
    lines = [
        f"Command: `make bench-score` (`python bench/default_path_bench.py "
        f"--sizes {' '.join(str(s) for s in sizes)} --rounds {args.rounds}"
        f"{' --dag' if args.dag else ''}`), {time.strftime('%Y-%m-%d')}, {machine()}; "
        f"the whole bench took {seconds:.0f} s. Other work may have shared the cores: the "
        "contenders ran in interleaved rounds and each shows its best round.",
        "",
        f"Dataset: 64 float32 features and an int64 key in 500,000-row files of 100,000-row "
        f"row groups (bench/score_bench.py's); model {MODEL} logged with `mlflow.pytorch` "
        "(pickle). batchscore: `batchscore run` with no running cluster (the default, "
        "`--cluster local`: one Dask worker in the run's process, 2 shards at once), a fresh "
        "process on a fresh home per run, embedded store, MLflow run recording on. The plain "
        "loop: a fresh `python -c` that imports pandas and MLflow, `mlflow.pyfunc.load_model` "
        "once, then `predict(pd.read_parquet(f))` and a Parquet write per file.",
        "",
        "The serial limit: Parquet decode to a float32 matrix (Arrow's threads) and the "
        "forward pass on decoded tensors (torch on every core, the best of six batch "
        "sizes), measured in the bench's process in each round at that size (the best "
        "kept); limit seconds = rows ÷ decode rate + rows ÷ forward rate. The DAG ran "
        "after the other rounds (an idle `airflow standalone` takes CPU), each DAG run "
        "beside a CLI run of the same size, whose time its ratio uses; a DAG run's time is "
        "from its trigger to its end as Airflow records it (`end_date`), not to the poll "
        "(every 3 s) that sees it end.",
        "",
        "### Whole run and score step",
        "",
    ]
    rows = []
    for size in sizes:
        cli, loop = best.get(f"cli-{size}"), best.get(f"loop-{size}")
        if not cli or not loop:
            continue
        score = cli["steps"]["score"]
        limit_seconds = size / limits[size]
        rows.append(
            [
                f"{size:,}",
                f"{cli['wall']:.2f}",
                f"{loop['wall']:.2f}",
                ratio(cli["wall"], loop["wall"]),
                f"{score:.2f}",
                f"{limit_seconds:.2f}",
                ratio(limit_seconds, score),
                f"{loop['work']:.2f}",
                ratio(loop["work"], score),
            ]
        )
    lines.append(
        table(
            [
                "rows",
                "batchscore run (s)",
                "plain loop process (s)",
                "run ÷ loop",
                "score step (s)",
                "serial limit (s)",
                "score ÷ limit (speed)",
                "loop load+predict (s)",
                "score speed ÷ loop",
            ],
            rows,
        )
    )
    lines += [
        "",
        "Speeds are ratios of times inverted, so above 1 is faster: 'score ÷ limit' is "
        "limit seconds ÷ score seconds; 'score speed ÷ loop' is the loop's load+predict "
        "seconds ÷ the score step's.",
        "",
        "### Validation",
        "",
    ]
    rows = []
    for size in sizes:
        cli, nochecks = best.get(f"cli-{size}"), best.get(f"nochecks-{size}")
        if not cli or not nochecks:
            continue
        added = max(cli["steps"]["score"] - nochecks["steps"]["score"], 0.0)
        waited = cli["docs_waited_seconds"]
        validation = added + cli["steps"]["validate"] + waited
        rows.append(
            [
                f"{size:,}",
                f"{nochecks['steps']['score']:.2f}",
                f"{cli['steps']['score']:.2f}",
                f"{added:.2f}",
                f"{cli['steps']['validate']:.2f}",
                f"{cli['docs_seconds']:.2f}",
                f"{waited:.2f}",
                f"{validation:.2f}",
                ratio(validation, cli["steps"]["score"]),
            ]
        )
    lines.append(
        table(
            [
                "rows",
                "score step, part checks off (s)",
                "score step, part checks on (s)",
                "checks added (s)",
                "validate step (s)",
                "Data Docs, built aside (s)",
                "run waited for them (s)",
                "validation (s)",
                "÷ score step",
            ],
            rows,
        )
    )
    lines += ["", "### Fixed and per-row cost (least squares over the sizes)", ""]
    rows = []
    cli_points = {s: best[f"cli-{s}"] for s in sizes if f"cli-{s}" in best}
    parts = {step: [(s, r["steps"][step]) for s, r in cli_points.items()] for step in STEPS}
    parts["process (imports, start-up, exit)"] = [
        (s, r["wall"] - sum(r["steps"].values())) for s, r in cli_points.items()
    ]
    parts["whole run"] = [(s, r["wall"]) for s, r in cli_points.items()]
    loop_points = [(s, best[f"loop-{s}"]["wall"]) for s in sizes if f"loop-{s}" in best]
    for name, points in parts.items():
        fixed, per_row = fit(points)
        rows.append([f"CLI: {name}", f"{fixed:.2f}", f"{per_row * 1e6:.2f}"])
    if loop_points:
        fixed, per_row = fit(loop_points)
        rows.append(["plain loop process", f"{fixed:.2f}", f"{per_row * 1e6:.2f}"])
    dag_sizes = [s for s in sizes if f"dag-{s}" in best]
    if dag_sizes:
        tasks = sorted({t for s in dag_sizes for t in best[f"dag-{s}"]["tasks"]})
        for task in tasks:
            points = [(s, best[f"dag-{s}"]["tasks"].get(task, 0.0)) for s in dag_sizes]
            fixed, per_row = fit(points)
            rows.append([f"DAG task: {task}", f"{fixed:.2f}", f"{per_row * 1e6:.2f}"])
        points = [(s, best[f"dag-{s}"]["wall"]) for s in dag_sizes]
        fixed, per_row = fit(points)
        rows.append(["DAG: trigger to success", f"{fixed:.2f}", f"{per_row * 1e6:.2f}"])
    lines.append(table(["part", "fixed (s)", "per million rows (s)"], rows))
    if dag_sizes:
        lines += ["", "### The DAG under the scheduler", ""]
        rows = []
        for size in dag_sizes:
            dag, cli = best[f"dag-{size}"], best.get(f"cli-beside-dag-{size}")
            beside = {t: s for t, s in dag["tasks"].items() if t in BESIDE_THE_CHAIN}
            busy = sum(dag["tasks"].values()) - sum(beside.values())
            rows.append(
                [
                    f"{size:,}",
                    f"{dag['wall']:.2f}",
                    f"{busy:.2f}",
                    f"{dag['wall'] - busy:.2f}",
                    ", ".join(f"{t} {s:.2f}" for t, s in sorted(beside.items())),
                    f"{cli['wall']:.2f}" if cli else "",
                    ratio(dag["wall"], cli["wall"]) if cli else "",
                ]
            )
        lines.append(
            table(
                [
                    "rows",
                    "DAG run, trigger to success (s)",
                    "its chain's task durations (s)",
                    "scheduling between them (s)",
                    "beside the chain (s)",
                    "CLI run beside it (s)",
                    "DAG ÷ CLI",
                ],
                rows,
            )
        )
    lines += ["", verdicts(results)]
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> str:
    """The issue's targets against what was measured: met or NOT met, each."""
    best, limits = results["best"], results["limits"]
    out = ["Targets (issue 18), on the default path:", ""]

    def line(text: str, ok: bool) -> None:
        out.append(f"- {text}: {'met' if ok else 'NOT met'}")

    for size in results["sizes"]:
        cli, loop = best.get(f"cli-{size}"), best.get(f"loop-{size}")
        if not cli or not loop:
            continue
        score = cli["steps"]["score"]
        speed = (size / limits[size]) / score
        if size >= 2_000_000:
            line(
                f"score step ≥ 0.85× the serial limit at {size:,} rows ({speed:.3f}×)",
                speed >= 0.85,
            )
        faster = loop["work"] / score
        line(f"score step faster than the plain loop at {size:,} rows ({faster:.3f}×)", faster > 1)
        whole = cli["wall"] / loop["wall"]
        if size == 2_000_000:
            line(
                f"whole run ≤ 1.5× the plain loop process at 2,000,000 rows ({whole:.3f}×)",
                whole <= 1.5,
            )
        if size == 20_000_000:
            line(
                f"whole run ≤ 1.2× the plain loop process at 20,000,000 rows ({whole:.3f}×)",
                whole <= 1.2,
            )
        nochecks = best.get(f"nochecks-{size}")
        if size == 2_000_000 and nochecks:
            added = max(score - nochecks["steps"]["score"], 0.0)
            share = (added + cli["steps"]["validate"] + cli["docs_waited_seconds"]) / score
            line(f"validation ≤ 0.2× the score step at 2,000,000 rows ({share:.3f}×)", share <= 0.2)
        dag, beside = best.get(f"dag-{size}"), best.get(f"cli-beside-dag-{size}")
        if size == 2_000_000 and dag and beside:
            dag_ratio = dag["wall"] / beside["wall"]
            line(f"DAG ≤ 2× the CLI run at 2,000,000 rows ({dag_ratio:.3f}×)", dag_ratio <= 2)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000, 20_000_000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dag", action="store_true", help="also the DAG under airflow standalone")
    parser.add_argument("--dag-sizes", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument(
        "--validation-max-rows",
        type=int,
        default=2_000_000,
        help="largest size at which the score step also runs with the part checks off",
    )
    parser.add_argument("--cache", default=str(REPO / ".bench-data" / "score"))
    parser.add_argument("--no-docs", action="store_true", help="print, do not write the docs")
    args = parser.parse_args()
    started = time.perf_counter()
    results = bench(args)
    text = render(results, args, time.perf_counter() - started)
    print(json.dumps(results, indent=2, default=str))
    if args.no_docs:
        print(text)
    else:
        write_section(TITLE, text)


if __name__ == "__main__":
    main()
