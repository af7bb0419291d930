"""Job configs → DAGs, without a database: validation messages, the trigger form, the parse.

The parse test imports the DAGs folder the way Airflow's DAG processor does (a
``BundleDagBag`` in a fresh interpreter) and checks that none of the heavy libraries got
imported; it prints how long the parse took (it asserts no time: tests never do).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import BIN, REPO

DAGS = REPO / "dags"
HEAVY = (
    "torch",
    "mlflow",
    "dask",
    "distributed",
    "pandas",
    "pyarrow",
    "numpy",
    "scipy",
    "matplotlib",
    "great_expectations",
    "jobs.steps",
    "scoring.engine",
    "scoring.inputs",
    "kv_export.store",
    "registry.mlflow_registry",
)
GOOD = """\
name: daily
namespace: daily
model_uri: models:/churn@champion
input_path: /data/churn/dt={{ ds }}
key_column: customer_id
schedule: "0 2 * * *"
start_date: 2026-11-20
catchup: true
batch_size: 512
workers: 3
owner: data-science
tags: [churn]
retries: 4
retry_delay: 30s
max_active_runs: 2
deadline: 1h30m
execution_timeout: 2h
timeouts: {score: 3h, validate: 20m}
"""


@pytest.fixture
def dag_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ModuleType]]:
    """``batchscore_dags`` imported as Airflow imports it: from the DAGs folder on sys.path."""
    monkeypatch.syspath_prepend(str(DAGS))
    from batchscore_dags import callbacks, config, notify, pipeline, runs

    yield {
        "config": config,
        "pipeline": pipeline,
        "runs": runs,
        "callbacks": callbacks,
        "notify": notify,
    }


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def problems_of(config: ModuleType, folder: Path) -> list[str]:
    return list(config.load_jobs(folder).problems)


def test_a_valid_config_becomes_a_job(dag_modules: dict[str, ModuleType], tmp_path: Path) -> None:
    config = dag_modules["config"]
    write(tmp_path, "daily.yaml", GOOD)
    found = config.load_jobs(tmp_path)
    assert found.problems == []
    job = found.jobs[0].config
    assert job.dag_id == "score_daily" and job.batch_size == 512 and job.workers == 3
    assert job.retry_delay == timedelta(seconds=30) and job.deadline == timedelta(minutes=90)
    assert job.start_date.isoformat() == "2026-11-20T00:00:00+00:00"
    steps = ("resolve", "plan", "score", "validate", "export", "publish")
    hours = {step: limit / timedelta(hours=1) for step, limit in job.step_timeouts(steps).items()}
    assert hours == {step: 2.0 for step in steps} | {"score": 3.0, "validate": 1 / 3}


def test_a_step_without_a_timeout_has_none(
    dag_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    import yaml

    config = dag_modules["config"]
    data = yaml.safe_load(GOOD)
    data.pop("execution_timeout")
    write(tmp_path, "daily.yaml", yaml.safe_dump(data))
    job = config.load_jobs(tmp_path).jobs[0].config
    assert job.step_timeouts(("resolve", "score", "validate")) == {
        "score": timedelta(hours=3),
        "validate": timedelta(minutes=20),
    }


def test_the_reports_task_runs_beside_export_and_publish_under_the_validate_timeout(
    dag_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    """The validate step's reports (Data Docs, drift plot) are a task of their own, after
    validate and beside export → publish (nothing waits for them), under the validate
    step's timeout."""
    config, pipeline = dag_modules["config"], dag_modules["pipeline"]
    write(tmp_path, "daily.yaml", GOOD)
    (job,) = config.load_jobs(tmp_path).jobs
    dag = pipeline.build_dag(pipeline.job_spec(job))
    docs = dag.get_task("reports")
    assert docs.upstream_task_ids == {"validate"} and docs.downstream_task_ids == set()
    assert dag.get_task("export").upstream_task_ids == {"validate"}
    assert dag.get_task("publish").upstream_task_ids == {"export"}
    assert docs.execution_timeout == dag.get_task("validate").execution_timeout
    assert docs.execution_timeout == timedelta(minutes=20)


@pytest.mark.parametrize(
    ("change", "field", "expected", "found"),
    [
        ({"model_uri": "churn"}, "model_uri", "models:/<name>@<alias>", "'churn'"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1", "found 0"),
        ({"batch_size": "lots"}, "batch_size", "valid integer", "'lots'"),
        ({"schedule": "every night"}, "schedule", "cron string", "'every night'"),
        ({"schedule": {"assets": "x://y"}}, "schedule", "{asset: <asset uri>}", "assets"),
        ({"retry_delay": "soon"}, "retry_delay", "a duration such as 90s", "'soon'"),
        ({"store_url": "redis://:pw@redis:6379/0"}, "store_url", "without a password", ":***@"),
        ({"store_url": "s3://bucket/x"}, "store_url", "lmdb:///path", "'s3://bucket/x'"),
        ({"shadow": "models:/x"}, "shadow", "alias of the job's model", "'models:/x'"),
        ({"shadow": "models:/churn@champion"}, "shadow", "other than the live model", ""),
        ({"scheduel": "0 2 * * *"}, "scheduel", "one of the job config fields", "unknown"),
        ({"key_column": None}, "key_column", "valid string", "None"),
        ({"execution_timeout": "soon"}, "execution_timeout", "a duration such as", "'soon'"),
        ({"execution_timeout": 0}, "execution_timeout", "a positive duration", "found 0"),
        ({"timeouts": "2h"}, "timeouts", "mapping of step to duration", "'2h'"),
        ({"timeouts": {"scor": "2h"}}, "timeouts.scor", "one of the steps (resolve, plan", ""),
        ({"timeouts": {"validate": "20x"}}, "timeouts.validate", "a duration such", "'20x'"),
        ({"timeouts": {"score": "0s"}}, "timeouts.score", "a positive duration", "'0s'"),
    ],
)
def test_a_bad_field_is_named_with_file_expectation_and_value(
    dag_modules: dict[str, ModuleType],
    tmp_path: Path,
    change: dict[str, Any],
    field: str,
    expected: str,
    found: str,
) -> None:
    import yaml

    config = dag_modules["config"]
    data = yaml.safe_load(GOOD) | change
    path = write(tmp_path, "daily.yaml", yaml.safe_dump(data))
    [problem] = problems_of(config, tmp_path)
    assert problem.startswith(f"{path}: ")
    assert f"field '{field}'" in problem and expected in problem and found in problem


def test_structural_problems_name_the_file(
    dag_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    config = dag_modules["config"]
    missing = write(tmp_path, "missing.yaml", "name: missing\nmodel_uri: models:/churn/1\n")
    broken = write(tmp_path, "broken.yaml", "name: broken\n  model_uri: [\n")
    listed = write(tmp_path, "listed.yaml", "- name: listed\n")
    catchup = write(tmp_path, "catchup.yaml", GOOD.replace("start_date: 2026-11-20\n", ""))
    problems = "\n".join(problems_of(config, tmp_path))
    assert f"{missing}: field 'input_path': expected a value; found none" in problems
    assert f"{missing}: field 'key_column': expected a value; found none" in problems
    assert f"{broken}: not valid YAML at line 2" in problems
    assert f"{listed}: expected a mapping of job fields" in problems and "found a list" in problems
    assert f"{catchup}: field 'start_date': expected the first logical date" in problems


def test_one_bad_file_leaves_the_other_jobs(
    dag_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    config = dag_modules["config"]
    write(tmp_path, "daily.yaml", GOOD)
    write(tmp_path, "weekly.yaml", GOOD.replace("name: daily", "name: weekly"))
    first = write(tmp_path, "a.yaml", GOOD.replace("name: daily", "name: twin"))
    second = write(tmp_path, "b.yml", GOOD.replace("name: daily", "name: twin"))
    write(tmp_path, "bad.yaml", "name: bad\n")
    found = config.load_jobs(tmp_path)
    assert sorted(j.config.dag_id for j in found.jobs) == ["score_daily", "score_weekly"]
    assert any(f"{first} and {second}: field 'name'" in p for p in found.problems)
    with pytest.raises(config.JobConfigError) as raised:
        found.raise_for_problems()
    assert "bad.yaml: field 'model_uri'" in str(raised.value)
    missing = config.load_jobs(tmp_path / "nope")
    assert missing.jobs == [] and "does not exist (BATCHSCORE_DAG_JOBS_DIR)" in missing.problems[0]


def test_the_trigger_form_validates_what_it_is_given(dag_modules: dict[str, ModuleType]) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    pipeline = dag_modules["pipeline"]
    form = pipeline.form_params(
        pipeline.FormDefaults(input_path="/data/dt={{ ds }}", namespace="daily", batch_size=64)
    )
    assert {name: p.resolve() for name, p in form.items()} == {
        "input_path": "/data/dt={{ ds }}",
        "model_uri": "models:/churn@champion",
        "key_column": "customer_id",
        "namespace": "daily",
        "store_url": None,
        "features": None,
        "batch_size": 64,
        "shadow": None,
        "dry_run": False,
        "force": False,
    }
    accepted = {
        "model_uri": "models:/churn/2",
        "namespace": "",
        "store_url": "redis://redis:6379/0",
        "batch_size": None,
        "shadow": "challenger",
    }
    for name, value in accepted.items():
        assert form[name].resolve(value) == value
    refused: dict[str, object] = {
        "input_path": "",
        "model_uri": "churn",
        "namespace": "no spaces",
        "store_url": "s3://bucket",
        "batch_size": 0,
        "shadow": "models:/churn",
        "dry_run": "yes",
    }
    for name, bad in refused.items():
        with pytest.raises(ParamValidationError):
            form[name].resolve(bad)


MODEL_URIS = (
    "models:/churn@champion",
    "models:/churn/2",
    "models:/churn/latest",
    "models:/m-0123456789abcdef0123456789abcdef",
    "runs:/0123456789abcdef0123456789abcdef/model",
    "runs:/0123456789abcdef/models/churn",
)
NOT_MODEL_URIS = (
    "churn",
    "models:/churn",  # neither a version nor an alias
    "models:/churn/Production",  # a stage: deprecated by MLflow
    "models:/churn/2/extra",
    "models:/churn@",
    "runs:/0123456789abcdef",  # a run, but no model folder in it
    "runs:/0123456789abcdef/",
    "s3://bucket/model",
)


@pytest.mark.parametrize("uri", MODEL_URIS)
def test_every_pinnable_model_uri_is_accepted(
    dag_modules: dict[str, ModuleType], tmp_path: Path, uri: str
) -> None:
    import yaml

    pipeline, config = dag_modules["pipeline"], dag_modules["config"]
    assert pipeline.form_params(pipeline.FormDefaults())["model_uri"].resolve(uri) == uri
    write(tmp_path, "daily.yaml", yaml.safe_dump(yaml.safe_load(GOOD) | {"model_uri": uri}))
    assert problems_of(config, tmp_path) == []


@pytest.mark.parametrize("uri", NOT_MODEL_URIS)
def test_other_model_uris_are_refused_naming_the_forms(
    dag_modules: dict[str, ModuleType], tmp_path: Path, uri: str
) -> None:
    import yaml
    from airflow.sdk.exceptions import ParamValidationError

    pipeline, config = dag_modules["pipeline"], dag_modules["config"]
    with pytest.raises(ParamValidationError):
        pipeline.form_params(pipeline.FormDefaults())["model_uri"].resolve(uri)
    path = write(tmp_path, "daily.yaml", yaml.safe_dump(yaml.safe_load(GOOD) | {"model_uri": uri}))
    [problem] = problems_of(config, tmp_path)
    assert problem.startswith(f"{path}: field 'model_uri': expected models:/<name>@<alias>, ")
    assert "models:/<name>/latest, models:/m-<model id> or runs:/<run id>/" in problem


def test_a_job_without_a_registered_model_names_its_namespace_and_shadow_uri(
    dag_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    """The default namespace is the registered model's name, and a bare shadow alias an
    alias of it: a logged model or a run's folder has neither."""
    import yaml
    from airflow.sdk.exceptions import ParamValidationError

    config = dag_modules["config"]
    run_uri = "runs:/0123456789abcdef/model"
    data = yaml.safe_load(GOOD) | {"model_uri": run_uri}
    data.pop("namespace")
    path = write(tmp_path, "daily.yaml", yaml.safe_dump(data))
    [problem] = problems_of(config, tmp_path)
    assert problem.startswith(f"{path}: field 'namespace': expected a namespace")
    assert f"'{run_uri}' names no registered model" in problem

    write(tmp_path, "daily.yaml", yaml.safe_dump(data | {"namespace": "d", "shadow": "next"}))
    [problem] = problems_of(config, tmp_path)
    assert problem.startswith(f"{path}: field 'shadow': expected a model URI")
    assert "found 'next'" in problem
    shadow = {"namespace": "d", "shadow": "models:/churn/latest"}
    write(tmp_path, "daily.yaml", yaml.safe_dump(data | shadow))
    assert problems_of(config, tmp_path) == []
    form = dag_modules["pipeline"].form_params(dag_modules["pipeline"].FormDefaults())
    assert form["shadow"].resolve("models:/churn/latest") == "models:/churn/latest"
    assert form["shadow"].resolve(run_uri) == run_uri
    with pytest.raises(ParamValidationError):
        form["shadow"].resolve("models:/churn")


def test_run_ids_follow_the_logical_date(dag_modules: dict[str, ModuleType]) -> None:
    from datetime import UTC, datetime

    runs, config = dag_modules["runs"], dag_modules["config"]
    day = datetime(2026, 11, 20, tzinfo=UTC)
    assert runs.run_key("score_daily", "scheduled__x", day, None) == (
        "score_daily__2026-11-20T00:00:00+00:00"
    )
    # Airflow hands callbacks the logical date as JSON text: the same run.
    assert runs.run_key("score_daily", "manual__y", "2026-11-20T00:00:00Z", None) == (
        runs.run_key("score_daily", "backfill__z", day, None)
    )
    assert runs.run_key("batchscore", "manual__2026", None, None) == "batchscore__manual__2026"
    from jobs.shadow import candidate_uri

    candidate = candidate_uri("models:/churn@champion", "challenger")
    assert candidate == "models:/churn@challenger"
    assert candidate_uri("models:/churn@champion", "models:/other/3") == "models:/other/3"
    assert candidate_uri("models:/churn/2", "challenger") == "models:/churn@challenger"
    assert candidate_uri("models:/churn@champion", None) is None
    assert candidate_uri("models:/churn@champion", "") is None
    # A job config's shadow field becomes the same URI as the CLI's --shadow.
    job = config.JobConfig.model_validate(
        {"name": "j", "model_uri": "models:/churn@champion", "input_path": "/in",
         "key_column": "k", "shadow": "challenger"}
    )  # fmt: skip
    assert job.candidate == candidate
    assert runs.run_key("score_daily", "m", day, candidate).endswith(
        "__shadow_models:/churn@challenger"
    )
    # The config derives it without MLflow (DAG parsing must not import it): the same.
    for model, shadow in [
        ("models:/churn/latest", "challenger"),
        ("models:/churn/3", "models:/m-0123abcd"),
        ("models:/m-0123abcd", "runs:/0123abcd/model"),
        ("runs:/0123abcd/model", "models:/churn/latest"),
    ]:
        fields = {"model_uri": model, "shadow": shadow, "namespace": "ns"}
        derived = job.model_copy(update=fields).candidate
        assert derived == candidate_uri(model, shadow), (model, shadow)


def test_the_deadline_callback_says_which_step_the_run_is_in(
    dag_modules: dict[str, ModuleType],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from jobs.manifest import Manifest, ModelRecord, RunParams, safe_run_id

    monkeypatch.setenv("BATCHSCORE_HOME", str(tmp_path))
    key = dag_modules["runs"].run_key("score_daily", "scheduled__x", "2026-11-20T00:00:00Z", None)
    run_dir = tmp_path / "runs" / "daily" / safe_run_id(key)
    run_dir.mkdir(parents=True)
    model = ModelRecord(
        name="churn",
        version="1",
        uri="models:/churn/1",
        requested="models:/churn@champion",
        local_dir=str(run_dir / "model"),
        flavor="pytorch",
        serialization="pickle",
        signature_kind="columns",
        features=["f0"],
    )
    params = RunParams(
        input_path="/data",
        model_uri="models:/churn@champion",
        key_column="customer_id",
        store_url="lmdb:///x",
        batch_size=0,
        workers=1,
        shard_rows=10,
    )
    manifest = Manifest(
        run_id=key, namespace="daily", run_dir=str(run_dir), params=params, model=model
    )
    for step in ("resolve", "plan"):
        manifest.record_step(step, seconds=0.1)
    manifest.save()
    context = {
        "dag_run": {
            "dag_id": "score_daily",
            "dag_run_id": "scheduled__2026-11-20T00:00:00+00:00",
            "logical_date": "2026-11-20T00:00:00Z",
        },
        "deadline": {"id": "d1", "deadline_time": "2026-11-20T02:00:00Z"},
    }
    with caplog.at_level(logging.WARNING, logger="batchscore.dag"):
        dag_modules["callbacks"].deadline_missed(context, job="score_daily")
    [message] = [r.getMessage() for r in caplog.records if r.name == "batchscore.dag"]
    assert "run scheduled__2026-11-20T00:00:00+00:00 of DAG score_daily is late" in message
    assert "deadline 2026-11-20T02:00:00Z passed while it is in step 'score'" in message
    assert "steps done: resolve, plan" in message and str(run_dir) in message


PARSE = """
import json, sys, time
started = time.perf_counter()
from pathlib import Path
from airflow.dag_processing.dagbag import BundleDagBag

folder = Path(sys.argv[1])
bag = BundleDagBag(dag_folder=str(folder), bundle_path=folder, bundle_name="dags-folder")
seconds = time.perf_counter() - started
heavy = [m for m in sys.argv[2].split(",") if m in sys.modules]
dags = {}
for dag in bag.dags.values():
    score = dag.get_task("score")
    dags[dag.dag_id] = {
        "tasks": [t.task_id for t in dag.topological_sort()],
        "pools": sorted({t.task_id for t in dag.tasks if t.pool == "batchscore_scoring"}),
        "params": {name: dag.params.get_param(name).value for name in dag.params},
        "timetable": type(dag.timetable).__name__,
        "cron": getattr(dag.timetable, "expression", None),
        "schedule_assets": [
            a.uri for a in getattr(getattr(dag.timetable, "asset_condition", None), "objects", ())
        ],
        "start_date": dag.start_date.isoformat() if dag.start_date else None,
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "owner": score.owner,
        "tags": sorted(dag.tags),
        "retries": score.retries,
        "retry_delay": score.retry_delay.total_seconds(),
        "backoff": score.retry_exponential_backoff,
        "retry_policy": type(score.retry_policy).__name__,
        "on_failure_callback": [
            f"{c.__module__}.{getattr(c, '__name__', type(c).__name__)}"
            for c in score.on_failure_callback
        ],
        "timeouts": {
            t.task_id: t.execution_timeout.total_seconds()
            for t in dag.tasks if t.execution_timeout is not None
        },
        "deadline": [
            {"interval": d.interval.total_seconds(), "reference": type(d.reference).__name__,
             "callback": d.callback.path} for d in dag.deadline or []
        ],
        "outlets": [o.name for o in dag.get_task("publish").outlets],
    }
print(json.dumps({"seconds": seconds, "heavy": heavy, "dags": dags, "errors": bag.import_errors}))
"""


def parse_dags(tmp_path: Path, jobs_dir: Path | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BATCHSCORE_"))}
    env |= {"AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    if jobs_dir is not None:
        env["BATCHSCORE_DAG_JOBS_DIR"] = str(jobs_dir)
    done = subprocess.run(
        [str(BIN / "python"), "-c", PARSE, str(DAGS), ",".join(HEAVY)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def test_parsing_the_dags_folder_imports_nothing_heavy(
    tmp_path: Path, record_property: Any
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write(jobs, "daily.yaml", GOOD)
    write(
        jobs,
        "chained.yaml",
        "name: chained\nmodel_uri: models:/churn@champion\ninput_path: /data/latest\n"
        "key_column: customer_id\nschedule: {asset: 'batchscore://daily'}\n"
        "shadow: challenger\n",  # the candidate's URI is derived without MLflow
    )
    write(jobs, "bad.yaml", GOOD.replace("name: daily", "name: bad").replace("512", "lots"))

    parsed = parse_dags(tmp_path, jobs)

    print(f"\nDAGs folder parsed in {parsed['seconds']:.2f} s (fresh interpreter, BundleDagBag)")
    record_property("dag_parse_seconds", round(parsed["seconds"], 3))
    assert parsed["heavy"] == [], f"parsing the DAGs imported {parsed['heavy']}"
    assert sorted(parsed["dags"]) == ["batchscore", "score_chained", "score_daily"]
    assert list(parsed["errors"]) == ["batchscore_job_configs.py"]
    error = parsed["errors"]["batchscore_job_configs.py"]
    assert f"{jobs / 'bad.yaml'}: field 'batch_size'" in error and "'lots'" in error

    daily = parsed["dags"]["score_daily"]
    assert daily["tasks"] == [
        "resolve",
        "plan",
        "score",
        "validate",
        "export",
        "publish",
        "reports",
    ]
    assert daily["pools"] == ["score"]
    assert daily["params"] == {
        "input_path": "/data/churn/dt={{ ds }}",
        "model_uri": "models:/churn@champion",
        "key_column": "customer_id",
        "namespace": "daily",
        "store_url": None,
        "features": None,
        "batch_size": 512,
        "shadow": None,
        "dry_run": False,
        "force": False,
    }
    assert daily["timetable"] == "CronTriggerTimetable"
    assert daily["cron"] == "0 2 * * *"
    assert daily["start_date"] == "2026-11-20T00:00:00+00:00" and daily["catchup"] is True
    assert daily["max_active_runs"] == 2 and daily["owner"] == "data-science"
    assert daily["tags"] == ["batchscore", "churn", "job"]
    assert (daily["retries"], daily["retry_delay"], daily["backoff"]) == (4, 30.0, 2.0)
    assert daily["retry_policy"] == "ExceptionRetryPolicy"
    assert daily["on_failure_callback"] == ["batchscore_dags.callbacks.on_task_failure"]
    assert daily["deadline"] == [
        {
            "interval": 5400.0,
            "reference": "DagRunQueuedAtDeadline",
            "callback": "batchscore_dags.callbacks.deadline_missed",
        }
    ]
    assert daily["outlets"] == ["batchscore_published"]
    hour = 3600.0
    assert daily["timeouts"] == {
        "resolve": 2 * hour,
        "plan": 2 * hour,
        "score": 3 * hour,
        "validate": 20 * 60.0,
        "export": 2 * hour,
        "publish": 2 * hour,
        "reports": 20 * 60.0,  # the validate step's reports: its timeout
    }

    chained = parsed["dags"]["score_chained"]
    assert chained["timetable"] == "AssetTriggeredTimetable"
    assert chained["schedule_assets"] == ["batchscore://daily/"]
    assert chained["deadline"] == [] and chained["catchup"] is False
    assert chained["timeouts"] == {}  # Airflow's default_task_execution_timeout applies
    adhoc = parsed["dags"]["batchscore"]
    assert adhoc["params"]["input_path"] == "" and adhoc["timetable"] == "NullTimetable"


def test_the_shipped_job_configs_parse(tmp_path: Path) -> None:
    parsed = parse_dags(tmp_path, None)
    assert parsed["errors"] == {}
    assert {"batchscore", "score_churn_daily"} <= set(parsed["dags"])
    demo = parsed["dags"]["score_churn_daily"]
    assert demo["params"]["input_path"] == "demo-data/dt={{ ds }}"  # under BATCHSCORE_HOME
    assert demo["params"]["key_column"] == "customer_id"
    assert demo["timetable"] == "CronTriggerTimetable"


# --- hostile input through the trigger form (issue 16) ----------------------------------


class _FullContextTask:
    """What Airflow's task did with the template before: render it with the whole context."""

    def render_template(self, template: str, context: dict[str, Any]) -> str:
        import jinja2

        return (
            jinja2.Environment(undefined=jinja2.StrictUndefined)
            .from_string(template)
            .render(context)
        )


def trigger_context(logical: bool = True) -> dict[str, Any]:
    """A task context as Airflow hands it over: the secrets are one attribute away."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    day = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
    secret = SimpleNamespace(password="topsecret", get_uri=lambda: "postgresql://u:topsecret@h")
    context: dict[str, Any] = {
        "task": _FullContextTask(),
        "dag": SimpleNamespace(dag_id="score_daily", default_args={"x": "topsecret"}),
        "dag_run": SimpleNamespace(run_id="manual__2026", conf={"x": "topsecret"}),
        "run_id": "manual__2026",
        "conn": SimpleNamespace(secret_db=secret),
        "var": SimpleNamespace(value=SimpleNamespace(token="topsecret")),
        "macros": SimpleNamespace(ds_add=lambda ds, n: ds, secret="topsecret"),
        "params": {"token": "topsecret"},
    }
    if logical:
        context |= {
            "ds": "2026-11-20",
            "ds_nodash": "20261120",
            "ts": day.isoformat(),
            "ts_nodash": "20261120T020000",
            "logical_date": day,
            "data_interval_start": day,
            "data_interval_end": day,
        }
    return context


@pytest.mark.parametrize(
    ("template", "rendered"),
    [
        ("/data/dt={{ ds }}", "/data/dt=2026-11-20"),
        ("/data/{{ ds_nodash }}/{{ ts_nodash }}", "/data/20261120/20261120T020000"),
        ("/data/{{ logical_date.strftime('%Y/%m/%d') }}", "/data/2026/11/20"),
        ("/data/{{ data_interval_start | ds }}", "/data/2026-11-20"),
        (
            "/data/{{ dag.dag_id }}/{{ dag_id }}/{{ run_id }}",
            "/data/score_daily/score_daily/manual__2026",
        ),
        ("in/{{ ds }}", "HOME/in/2026-11-20"),
        ("s3://bucket/churn/dt={{ ds }}/", "s3://bucket/churn/dt=2026-11-20/"),
    ],
)
def test_input_path_renders_date_macros(
    dag_modules: dict[str, ModuleType], tmp_path: Path, template: str, rendered: str
) -> None:
    found = dag_modules["runs"].render_input_path(template, trigger_context(), tmp_path)
    assert found == rendered.replace("HOME", str(tmp_path))


@pytest.mark.parametrize(
    "template",
    [
        "/data/{{ conn.secret_db.password }}",
        "/data/{{ conn.secret_db.get_uri() }}",
        "/data/{{ var.value.token }}",
        "/data/{{ macros.secret }}",
        "/data/{{ params.token }}",
        "/data/{{ dag_run.conf }}",
        "/data/{{ dag.default_args }}",
        "/data/{{ task }}",
        "/data/{{ ds.__class__.__mro__ }}",
        "/data/{{ logical_date.__class__.__init__.__globals__ }}",
        "/data/{{ ''.__class__ }}",
        "/data/{% for x in range(3) %}{{ x }}{% endfor %}",
        "/data/{{ 'x' * 1000000000 }}",
        "/data/{{ ds }",
    ],
)
def test_input_path_refuses_anything_but_date_macros(
    dag_modules: dict[str, ModuleType], tmp_path: Path, template: str
) -> None:
    from jobs.errors import RunError

    with pytest.raises(RunError) as refused:
        dag_modules["runs"].render_input_path(template, trigger_context(), tmp_path)
    message = str(refused.value)
    assert "input_path" in message and "ds, ds_nodash" in message, message
    assert "topsecret" not in message


def test_input_path_without_logical_date_names_the_reason(
    dag_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    from jobs.errors import RunError

    runs = dag_modules["runs"]
    assert runs.render_input_path("/data/x", trigger_context(False), tmp_path) == "/data/x"
    with pytest.raises(RunError) as refused:
        runs.render_input_path("/data/{{ ds }}", trigger_context(False), tmp_path)
    assert "logical date" in str(refused.value) and "input_path" in str(refused.value)


NAMESPACE_RULE = "1-128 characters of A-Z a-z 0-9 . _ -"
BAD_NAMESPACES = ["../../x", "/abs", "a b", "..", "a..b", ".hidden", "-x", "n" * 129]


def test_the_form_and_job_configs_use_the_namespace_rule(
    dag_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    import yaml
    from airflow.sdk.exceptions import ParamValidationError

    pipeline, config = dag_modules["pipeline"], dag_modules["config"]
    namespace = pipeline.form_params(pipeline.FormDefaults())["namespace"]
    for good in ("churn", "churn.v2", "Churn_daily-2", "n" * 128, None, ""):
        assert namespace.resolve(good) == good
    for bad in BAD_NAMESPACES:
        with pytest.raises(ParamValidationError):
            namespace.resolve(bad)
        path = write(
            tmp_path, "daily.yaml", yaml.safe_dump(yaml.safe_load(GOOD) | {"namespace": bad})
        )
        [problem] = problems_of(config, tmp_path)
        assert (
            problem.startswith(f"{path}: field 'namespace': expected ")
            and NAMESPACE_RULE in problem
        )


def test_a_job_whose_model_name_is_no_namespace_needs_one(
    dag_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    import yaml

    data = yaml.safe_load(GOOD) | {"model_uri": "models:/my model@champion"}
    data.pop("namespace")
    path = write(tmp_path, "daily.yaml", yaml.safe_dump(data))
    [problem] = problems_of(dag_modules["config"], tmp_path)
    assert problem.startswith(f"{path}: field 'namespace': expected a namespace")
    assert "'my model'" in problem
    write(tmp_path, "daily.yaml", yaml.safe_dump(data | {"namespace": "my_model"}))
    assert problems_of(dag_modules["config"], tmp_path) == []


def test_the_retry_policy_retries_a_missing_input_and_fails_bad_input_at_once(
    dag_modules: dict[str, ModuleType],
) -> None:
    """README: "a missing input is retried by the DAG" (it may land late); an error that a
    retry cannot fix fails the task at once. Evaluated as the worker evaluates it, after
    the scheduler's serialisation round trip."""
    from airflow.sdk import ExceptionRetryPolicy, RetryAction

    from batchscore.core.errors import InvalidName
    from jobs.errors import RunError
    from registry.errors import RegistryError
    from scoring.errors import (
        BadColumnType,
        DriftDetected,
        InputNotFound,
        ShardFailed,
        TooManyNulls,
        ValidationFailed,
    )

    policy = dag_modules["pipeline"].RETRY_POLICY
    for rule in policy.rules:  # a typo in a dotted path would match nothing, silently
        assert len(rule._resolve_exception_classes()) == len(rule._specs), rule.exception
    for evaluated in (policy, ExceptionRetryPolicy.deserialize(policy.serialize())):
        action = partial(_retry_action, evaluated)

        assert action(InputNotFound("Input /data/dt=2026-11-20 does not exist")) == (
            RetryAction.DEFAULT  # the task's retries and backoff apply
        )
        for fails in (
            BadColumnType("Input column 'f01' has type string"),
            TooManyNulls("'f04' is 5.00% null"),
            ValidationFailed("failed validation", failures=[]),
            DriftDetected("drifted", drift=[]),
            RegistryError("no such alias"),
            RunError("not scored"),
            InvalidName("bad namespace"),
        ):
            assert action(fails) == RetryAction.FAIL, type(fails).__name__
        # A failed shard or a lost connection may pass on the next try: retried.
        assert action(ShardFailed("2 of 6 shards failed")) == RetryAction.DEFAULT
        assert action(ConnectionError("store unreachable")) == RetryAction.DEFAULT


def _retry_action(policy: Any, error: BaseException) -> Any:
    return policy.evaluate(error, try_number=1, max_tries=3).action


# --- notifications (issue 19) ------------------------------------------------------------

NOTIFY = """\
notify:
  when: [gate]
  smtp: {to: ops@example.com, from: batchscore@example.com, conn_id: mail}
"""


def test_notify_names_events_recipients_and_connection(
    dag_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    config = dag_modules["config"]
    write(tmp_path, "daily.yaml", GOOD + NOTIFY)
    notify = config.load_jobs(tmp_path).jobs[0].config.notify
    assert notify.when == ["gate"] and notify.smtp.to == ["ops@example.com"]
    assert (notify.smtp.from_, notify.smtp.conn_id) == ("batchscore@example.com", "mail")
    write(tmp_path, "daily.yaml", GOOD + "notify: {smtp: {to: [a@example.com, b@example.com]}}")
    notify = config.load_jobs(tmp_path).jobs[0].config.notify
    assert notify.when == ["failure", "gate"] and notify.smtp.conn_id == "smtp_default"
    assert notify.smtp.from_ is None  # the connection's from_email


@pytest.mark.parametrize(
    ("notify", "field", "expected"),
    [
        (NOTIFY.replace("when:", "on:"), "notify", "expected 'when: [failure, gate]'"),
        (NOTIFY.replace("[gate]", "[crash]"), "notify.when.0", "'failure' or 'gate'"),
        (NOTIFY.replace("ops@example.com", "ops"), "notify.smtp.to", "mail addresses"),
        (NOTIFY.replace("conn_id", "connection"), "notify.smtp.connection", "(to, from, conn_id)"),
        (NOTIFY.replace("  smtp", "  slack"), "notify.slack", "(when, smtp)"),
        ("notify: {when: [gate]}", "notify.smtp", "expected a value; found none"),
    ],
)
def test_a_bad_notify_is_named_with_file_and_key(
    dag_modules: dict[str, ModuleType], tmp_path: Path, notify: str, field: str, expected: str
) -> None:
    path = write(tmp_path, "daily.yaml", GOOD + notify)
    problems = problems_of(dag_modules["config"], tmp_path)
    assert problems and all(p.startswith(f"{path}: ") for p in problems)
    assert any(f"field '{field}'" in p and expected in p for p in problems), problems


def test_a_blocked_gate_is_told_apart_from_a_failure(dag_modules: dict[str, ModuleType]) -> None:
    from types import SimpleNamespace

    from scoring.errors import DriftDetected, InputError, ValidationFailed

    notify = dag_modules["notify"]

    ti = SimpleNamespace(dag_id="score_daily", task_id="validate", run_id="manual__1", try_number=1)
    gated = notify.compose({"task_instance": ti, "exception": DriftDetected("drifted", drift=[])})
    assert gated.event == "gate"
    assert gated.subject.startswith("[batchscore] drift gate blocked DAG score_daily, run manual")
    failed = ValidationFailed("2 checks failed", failures=[])
    assert notify.compose({"task_instance": ti, "exception": failed}).subject.startswith(
        "[batchscore] validation gate blocked"
    )
    bad = InputError("Input column 'age' <is> missing {{ conn.x.password }}")
    message = notify.compose({"task_instance": ti, "exception": bad})
    assert message.event == "failure"
    assert message.subject == "[batchscore] step 'validate' failed: DAG score_daily, run manual__1"
    # The error is escaped HTML, and its braces stay text (no template is rendered).
    assert "&lt;is&gt; missing {{ conn.x.password }}" in message.html
