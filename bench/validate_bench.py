"""make bench-validate: what output validation costs next to the score step, on 10M rows.

Measured in one run, on bench/score_bench.py's synthetic dataset (64 float32 features
plus an int64 key, keys shuffled across files, so every part's key range overlaps every
other's and the uniqueness check across parts has to merge all of them) and a sigmoid
MLP whose output is named ``churn_probability`` (the default suite: row count, key not
null and unique, output not null, finite and within [0, 1]):

- **A, the default**: the score step with the per-part GX suite at the end of each
  shard's task on its worker, then the validate step in a fresh process (as the DAG's
  ``validate`` task runs it): stored part results merged, row count and key uniqueness
  across parts, Data Docs; then the drift gate against the live version, in the same
  process (as in the DAG's task);
- **B, the alternative**: the score step without per-part checks, then the validate
  step checking every part on a LocalCluster of its own (re-reading the output);
- the reference: B's score step, which does no validation work at all.

A's validation cost is ``(A's score step − B's score step) + A's validate step``.
Rounds run A and B interleaved; each measure keeps its best round. The first round's
A run is published (embedded store) so that later runs' drift gates compare against it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, table, write_section  # noqa: E402
from bench.score_bench import KEY, N_FEATURES, dataset  # noqa: E402

if TYPE_CHECKING:
    from batchscore.core.settings import RunSettings


class VariantRun(TypedDict):
    """A variant's run (or its best round, measure by measure), in seconds."""

    run_dir: str
    score: float
    validate: float
    drift: float | None  # None: no live version to compare with
    step: dict[str, Any]  # the manifest's record of the validate step
    gx_seconds_in_score: float  # worker-seconds of the per-part checks
    parts: int
    part_seconds: float | None  # a typical part's check; None without per-part checks
    set_up_seconds: float | None  # GX import + suite set-up, once per worker


class Results(TypedDict):
    rows: int
    best: dict[str, VariantRun]  # by variant: A, B (LocalCluster), C, D (running cluster)
    seconds: float


TITLE = "Validation cost (make bench-validate)"
TARGET = 0.20
OUTPUT = "churn_probability"
# The DAG's validate task in a fresh process: the GX suite, then the drift gate.
TASK = """
import json, sys, time
from jobs import steps
from jobs.manifest import load_manifest
started = time.perf_counter()
steps.validate(sys.argv[1])
validated = time.perf_counter()
steps.check_drift(sys.argv[1])
done = time.perf_counter()
manifest = load_manifest(sys.argv[1])
print(json.dumps({"validate": validated - started, "drift": done - validated,
                  "step": manifest.steps["validate"], "compared": manifest.drift["compared"]}))
"""


def log(message: str) -> None:
    print(f"[bench-validate {time.strftime('%H:%M:%S')}] {message}", flush=True)


def register_model(cache: Path) -> tuple[str, str]:
    """The score bench's MLP (64→256→256→1) with a sigmoid: a probability output."""
    import torch

    from batchscore.samples import log_and_register
    from scoring.reference import MLP

    tracking = f"sqlite:///{cache / 'mlflow.db'}"
    torch.manual_seed(0)
    registered = log_and_register(
        MLP(N_FEATURES, hidden=(256, 256), n_outputs=1, sigmoid=True).eval(),
        tracking_uri=tracking,
        artifact_root=cache / "artifacts",
        name="validate-bench",
        n_features=N_FEATURES,
        alias="bench",
        output_name=OUTPUT,
    )
    return tracking, registered.uri


def run_variant(
    settings: RunSettings,
    folder: Path,
    uri: str,
    run_id: str,
    checks: bool,
    args: argparse.Namespace,
    cluster: str | None = None,
) -> VariantRun:
    """resolve + plan, then the timed score step here and the validate task in a subprocess."""
    from jobs import steps

    on = {"cluster": cluster} if cluster else {}
    params = steps.make_params(
        settings,
        input_path=str(folder),
        model_uri=uri,
        key_column=KEY,
        namespace="bench",
        workers=args.workers,
        shard_rows=args.shard_rows,
        check_parts_in_score=checks,
        **on,
    )
    run_dir = steps.resolve(settings, params, run_id=run_id)["run_dir"]
    steps.plan(run_dir)
    started = time.perf_counter()
    steps.score(run_dir)
    score = time.perf_counter() - started
    done = subprocess.run(
        [sys.executable, "-c", TASK, run_dir],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"validate task failed: {done.stderr[-2000:]}")
    task = json.loads(done.stdout.strip().splitlines()[-1])
    parts = [json.loads(p.read_text()) for p in (Path(run_dir) / "validation").glob("part-*.json")]
    in_score = [(p["checked_by"], p["seconds"]) for p in parts] if checks else []
    part_seconds, set_up_seconds = split_set_up(in_score)
    return VariantRun(
        run_dir=run_dir,
        score=score,
        validate=task["validate"],
        drift=task["drift"] if task["compared"] else None,
        step=task["step"],
        gx_seconds_in_score=sum(seconds for _, seconds in in_score),
        parts=len(parts),
        part_seconds=part_seconds,
        set_up_seconds=set_up_seconds,
    )


def split_set_up(checked: list[tuple[str, float]]) -> tuple[float | None, float | None]:
    """A typical part's seconds, and the set-up a worker's first part pays on top (GX's
    import and the suite's set-up; the others don't): both None without checked parts."""
    if not checked:
        return None, None
    firsts = {w: max(s for v, s in checked if v == w) for w, _ in checked}
    rest = sorted(s for _, s in checked)[: len(checked) - len(firsts)] or [0.0]
    typical = float(statistics.median(rest))
    return typical, statistics.mean(firsts.values()) - typical


def warm_page_cache(folder: Path) -> None:
    """Read the input once, so that no round pays for a cold disk (the score bench does too)."""
    for path in sorted(folder.glob("*.parquet")):
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


def keep_best(best: dict[str, VariantRun], name: str, found: VariantRun) -> None:
    """Keep each measure's lowest round (the one least disturbed by the shared machine)."""
    old = best.setdefault(name, found)
    if old is found:
        return

    def lower(new: float | None, kept: float | None) -> bool:
        return new is not None and (kept is None or new < kept)

    if lower(found["score"], old["score"]):
        old["score"] = found["score"]
    if lower(found["validate"], old["validate"]):
        old["validate"], old["step"] = found["validate"], found["step"]
    if lower(found["drift"], old["drift"]):
        old["drift"] = found["drift"]
    if lower(found["gx_seconds_in_score"], old["gx_seconds_in_score"]):
        old["gx_seconds_in_score"] = found["gx_seconds_in_score"]
        old["set_up_seconds"] = found["set_up_seconds"]
    if lower(found["part_seconds"], old["part_seconds"]):
        old["part_seconds"] = found["part_seconds"]


def bench(args: argparse.Namespace) -> Results:
    from batchscore.core.settings import RunSettings

    started = time.perf_counter()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = dataset(cache, args.rows)
    warm_page_cache(folder)
    tracking, uri = register_model(cache)
    home = cache / "home"
    shutil.rmtree(home, ignore_errors=True)
    settings = RunSettings(home=home, mlflow_tracking_uri=tracking)
    best: dict[str, VariantRun] = {}
    cluster = None
    variants: list[tuple[str, bool, str | None]] = [("A", True, None), ("B", False, None)]
    if not args.skip_running_cluster:
        from batchscore.devcluster import RunningCluster

        log(f"starting a running cluster: dask scheduler + {args.workers} preloaded workers")
        cluster = RunningCluster(cache / "running-cluster", args.workers)
        variants += [("C", True, cluster.address), ("D", False, cluster.address)]
    try:
        run_rounds(args, settings, folder, uri, variants, best)
    finally:
        if cluster is not None:
            cluster.stop()
    return Results(rows=args.rows, best=best, seconds=time.perf_counter() - started)


def run_rounds(
    args: argparse.Namespace,
    settings: RunSettings,
    folder: Path,
    uri: str,
    variants: list[tuple[str, bool, str | None]],
    best: dict[str, VariantRun],
) -> None:
    from jobs import steps

    for round_ in range(1, args.rounds + 1):
        for name, checks, address in variants:
            log(f"round {round_}/{args.rounds}: {name} over {args.rows:,} rows")
            found = run_variant(
                settings, folder, uri, f"bench-{name}-{round_}", checks, args, address
            )
            log(
                f"{name}: score {found['score']:.1f} s, validate {found['validate']:.1f} s, "
                f"drift {found['drift'] if found['drift'] is None else round(found['drift'], 1)}"
            )
            keep_best(best, name, found)
            if round_ == 1 and name == "A":
                log("publishing round 1's A run: the live version later drift gates compare with")
                steps.export(found["run_dir"], settings)
                steps.publish(found["run_dir"], settings)
            elif round_ > 1 or name != "A":
                shutil.rmtree(found["run_dir"], ignore_errors=True)


def render(results: Results, args: argparse.Namespace) -> str:
    a, b = results["best"]["A"], results["best"]["B"]
    reference = b["score"]
    in_score = a["score"] - reference
    cost = in_score + a["validate"]
    measured = a["gx_seconds_in_score"] / args.workers + a["validate"]
    step = a["step"]

    def share(seconds: float | None) -> str:
        return "—" if seconds is None else f"{seconds / reference:.2f}"

    def shown(seconds: float | None) -> str:
        return "—" if seconds is None else f"{seconds:.2f}"

    rows = [
        ["score step without per-part checks (B: the reference)", shown(reference), "1.00"],
        ["score step with per-part checks (A, the default)", shown(a["score"]), share(a["score"])],
        [
            "  GX on the workers inside it (worker-seconds ÷ workers, GX import included)",
            shown(a["gx_seconds_in_score"] / args.workers),
            share(a["gx_seconds_in_score"] / args.workers),
        ],
        [
            "    of which GX import + suite set-up, once per worker (its first part − a typical "
            "part)",
            shown(a["set_up_seconds"]),
            share(a["set_up_seconds"]),
        ],
        [
            f"    a typical part's checks ({args.shard_rows:,} rows, GX run + result file)",
            shown(a["part_seconds"]),
            share(a["part_seconds"]),
        ],
        [
            "  A − B: what the per-part checks added to the score step",
            shown(in_score),
            share(in_score),
        ],
        [
            f"validate step after A ({step['parts_reused']} stored part results, "
            "row count, uniqueness across parts, Data Docs)",
            shown(a["validate"]),
            share(a["validate"]),
        ],
        [
            "  of which the global checks (row count, key merge over all parts)",
            shown(step["global_seconds"]),
            share(step["global_seconds"]),
        ],
        [
            "  of which Data Docs (GX import in this process included)",
            shown(step["docs_seconds"]),
            share(step["docs_seconds"]),
        ],
        [
            "**validation cost of A: (A − B) + validate step**",
            f"**{cost:.2f}**",
            f"**{cost / reference:.2f}**",
        ],
        [
            "  the same with the workers' own GX time in place of A − B",
            shown(measured),
            share(measured),
        ],
        [
            "B's validate step: every part checked on a LocalCluster of its own",
            shown(b["validate"]),
            share(b["validate"]),
        ],
        [
            "drift gate against the live version (KS + moved share, 200k sample, PNG)",
            shown(min(v for v in (a["drift"], b["drift"], float("inf")) if v is not None)),
            share(min(v for v in (a["drift"], b["drift"], float("inf")) if v is not None)),
        ],
    ]
    ratio = cost / reference
    verdict = "met" if max(ratio, measured / reference) <= TARGET else "NOT met"
    return "\n".join(
        [
            f"Command: `make bench-validate` (`python bench/validate_bench.py --rows {args.rows}`),"
            f" {time.strftime('%Y-%m-%d')}, {machine()}; other work shared the cores. "
            f"Dataset: {args.rows:,} rows of {N_FEATURES} float32 features plus an int64 key "
            "(bench/score_bench.py's, keys shuffled across files, so every part's key range "
            "overlaps every other's), MLP 64→256→256→1 with a sigmoid output "
            f"`{OUTPUT}`: the default suite (row count; key not null and unique; output not "
            f"null, finite and within [0, 1]). {args.workers} Dask workers, shards of "
            f"{args.shard_rows:,} rows ({a['parts']} parts). The score step runs in the "
            "benchmark's process; the validate step and the drift gate run in a fresh process, "
            "as the DAG's `validate` task does, so each pays its own GX import. "
            f"{args.rounds} interleaved rounds, each measure its best round; the whole run took "
            f"{results['seconds']:.0f} s.",
            "",
            table(["measure", "seconds", "÷ score step (B)"], rows),
            "",
            f"Target: validation ≤ {TARGET:.2f}× the score step's time. Measured: "
            f"{ratio:.2f}× ({measured / reference:.2f}× from the workers' own GX time) — "
            f"{verdict}. (Read as the two steps' timings alone, validate step ÷ "
            f"A's score step, it would be {a['validate'] / a['score']:.2f}×; that leaves out what "
            "the per-part checks add inside the score step.) The drift gate is not part of the "
            "target; it is shown for scale.",
            "",
            split_note(a, args, reference),
            *render_running(results, args),
        ]
    )


def render_running(results: Results, args: argparse.Namespace) -> list[str]:
    """The same runs on a running cluster (C with per-part checks, D without): workers
    started once with torch, MLflow and GX preloaded, Data Docs built by one of them."""
    if "C" not in results["best"]:
        return []
    c, d = results["best"]["C"], results["best"]["D"]
    reference = d["score"]
    in_score = c["score"] - reference
    cost = in_score + c["validate"]
    measured = c["gx_seconds_in_score"] / args.workers + c["validate"]
    step = c["step"]
    rows = [
        ["score step without per-part checks (D: the reference)", f"{reference:.2f}", "1.00"],
        [
            "score step with per-part checks (C)",
            f"{c['score']:.2f}",
            f"{c['score'] / reference:.2f}",
        ],
        [
            "  GX on the workers inside it (worker-seconds ÷ workers)",
            f"{c['gx_seconds_in_score'] / args.workers:.2f}",
            f"{c['gx_seconds_in_score'] / args.workers / reference:.2f}",
        ],
        [
            "  C − D: what the per-part checks added",
            f"{in_score:.2f}",
            f"{in_score / reference:.2f}",
        ],
        [
            f"validate step after C ({step['parts_reused']} stored part results, row count, "
            f"uniqueness across parts, Data Docs built on {step.get('docs_built_on', '?')})",
            f"{c['validate']:.2f}",
            f"{c['validate'] / reference:.2f}",
        ],
        [
            "  of which the global checks",
            f"{step['global_seconds']:.2f}",
            f"{step['global_seconds'] / reference:.2f}",
        ],
        [
            "  of which Data Docs (on a worker: GX imported already)",
            f"{step['docs_seconds']:.2f}",
            f"{step['docs_seconds'] / reference:.2f}",
        ],
        [
            "**validation cost of C: (C − D) + validate step**",
            f"**{cost:.2f}**",
            f"**{cost / reference:.2f}**",
        ],
        [
            "  the same with the workers' own GX time in place of C − D",
            f"{measured:.2f}",
            f"{measured / reference:.2f}",
        ],
        [
            "D's validate step: every part checked on the running cluster",
            f"{d['validate']:.2f}",
            f"{d['validate'] / reference:.2f}",
        ],
    ]
    ratio = max(cost, measured) / reference
    verdict = "met" if ratio <= TARGET else "NOT met"
    return [
        "",
        "On a running cluster, as docker-compose deploys it (`--cluster tcp://…`; "
        f"`batchscore.devcluster`: `dask scheduler` and {args.workers} single-threaded "
        "`dask worker --preload scoring.preload`, started once before the rounds, so GX is "
        "imported as each worker starts rather than in a run; the validate task hands the "
        "Data Docs to a worker). Same data, model, suite and rounds:",
        "",
        table(["measure", "seconds", "÷ score step (D)"], rows),
        "",
        f"Target on a running cluster: {cost / reference:.2f}× "
        f"({measured / reference:.2f}× from the workers' own GX time) — {verdict}.",
    ]


def split_note(a: VariantRun, args: argparse.Namespace, reference: float) -> str:
    """How much of the cost is paid once per process, and how much grows with the rows."""
    step = a["step"]
    fixed = a["set_up_seconds"] + step["docs_seconds"]
    per_row = a["parts"] / args.workers * a["part_seconds"] + step["global_seconds"]
    return (
        f"Where it goes: paid once whatever the rows, GX's import and the suite's set-up on "
        f"each worker ({a['set_up_seconds']:.1f} s, the workers in parallel) and GX's import "
        f"for the Data Docs in the validate step ({step['docs_seconds']:.1f} s): "
        f"{fixed:.1f} s, {fixed / reference:.2f}×; growing with the rows, {a['parts']} parts × "
        f"{a['part_seconds']:.2f} s over {args.workers} workers and the key merge "
        f"({step['global_seconds']:.2f} s): {per_row:.1f} s, {per_row / reference:.2f}×."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)  # the cores are shared: best of three
    parser.add_argument("--cache", default=str(REPO / ".bench-data" / "validate"))
    parser.add_argument(
        "--no-docs", action="store_true", help="print the section instead of writing the docs"
    )
    parser.add_argument(
        "--skip-running-cluster",
        action="store_true",
        help="do not measure on a running cluster (dask scheduler + preloaded dask workers)",
    )
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    results = bench(args)
    print(json.dumps(results, indent=2, default=str))
    text = render(results, args)
    if args.no_docs:
        print(text)
    else:
        write_section(TITLE, text)


if __name__ == "__main__":
    main()
