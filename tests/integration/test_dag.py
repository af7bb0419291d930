"""The DAG under real Airflow: DagBag parsing and ``airflow dags test`` on a SQLite home."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from jobs.manifest import load_manifest
from kv_export.store import open_store
from tests.conftest import BIN, KEY, REPO, Registry

pytestmark = pytest.mark.airflow
DAGS = REPO / "dags"


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("airflow")
    done = subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"],
        env=airflow_env(home, {}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return home


def airflow_env(home: Path, base: dict[str, str]) -> dict[str, str]:
    import os

    return (base or dict(os.environ)) | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }


def test_dagbag_has_no_import_errors(airflow_home: Path) -> None:
    # A bundle's DagBag, as the DAG processor parses it: the folder is on sys.path.
    code = (
        "import json, pathlib; from airflow.dag_processing.dagbag import BundleDagBag; "
        f"folder = pathlib.Path({str(DAGS)!r}); "
        "bag = BundleDagBag(dag_folder=str(folder), bundle_path=folder, bundle_name='dags'); "
        "dag = bag.dags.get('batchscore'); "
        "print(json.dumps({'errors': {str(k): str(v) for k, v in bag.import_errors.items()}, "
        "'tasks': [t.task_id for t in dag.topological_sort()] if dag else None, "
        "'params': sorted(dag.params) if dag else None}))"
    )
    done = subprocess.run(
        [str(BIN / "python"), "-c", code],
        env=airflow_env(airflow_home, {}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    assert found["tasks"] == [
        "resolve",
        "plan",
        "score",
        "validate",
        "export",
        "publish",
        "reports",
    ]
    assert {
        "input_path",
        "model_uri",
        "key_column",
        "namespace",
        "store_url",
        "batch_size",
        "dry_run",
        "force",
    } <= set(found["params"])
    # That parsing the DAGs folder imports no heavy library: tests/unit/test_dag_config.py.


def test_plain_dagbag_parses_the_dags_from_any_directory(
    airflow_home: Path, tmp_path: Path
) -> None:
    """``airflow dags list --local`` parses with a plain DagBag, without the DAGs folder on
    sys.path: the DAG files make their helpers importable themselves."""
    done = subprocess.run(
        [str(BIN / "airflow"), "dags", "list", "--local", "--output", "json"],
        cwd=tmp_path,  # not the repository: nothing importable by accident
        env=airflow_env(airflow_home, {}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    listed = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"batchscore", "score_churn_daily"} <= {d["dag_id"] for d in listed}


def dags_test(
    home: Path, env: dict[str, str], conf: dict[str, object]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "airflow"), "dags", "test", "batchscore", "-c", json.dumps(conf)],
        env=airflow_env(home, env),
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
@pytest.mark.e2e
def test_airflow_dags_test_runs_the_pipeline(
    airflow_home: Path, env: dict[str, str], registry: Registry, dataset: Path
) -> None:
    conf: dict[str, object] = {
        "input_path": str(dataset),
        "model_uri": "models:/churn@champion",
        "key_column": KEY,
        "namespace": "dagged",
    }
    done = dags_test(airflow_home, env, conf)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    store = open_store(f"lmdb://{Path(env['BATCHSCORE_HOME']) / 'store'}")
    live = store.state("dagged").live_info()
    # `airflow dags test` gives the run a logical date: the run id is derived from it.
    assert live is not None and live.run_id.startswith("batchscore__20")
    assert live.model_version == "1" and live.key_count == 12_000
    assert store.get_many("dagged", live, [b"1000000"])[0] is not None
    # The validate task left the Data Docs and the drift plot to the reports task.
    (ran,) = (Path(env["BATCHSCORE_HOME"]) / "runs" / "dagged").glob("*/manifest.json")
    manifest = load_manifest(ran.parent)
    validate = manifest.steps["validate"]
    assert validate["docs_built_on"].startswith("reports task, process "), validate
    assert validate["docs_seconds"] > 0 and "docs_error" not in validate
    assert Path(manifest.reports["data_docs"]).is_file()
    drift = manifest.steps["drift"]
    assert drift["plot_job"] and drift["plot_seconds"] > 0 and "plot_error" not in drift
    assert Path(manifest.reports["distributions_png"]).is_file()

    dry = dags_test(airflow_home, env, conf | {"namespace": "dry", "dry_run": True})
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-5000:]
    assert store.state("dry").versions == {}
    manifests = list((Path(env["BATCHSCORE_HOME"]) / "runs" / "dry").glob("*/manifest.json"))
    steps = load_manifest(manifests[0].parent).steps
    assert steps["validate"]["success"] is True and steps["export"]["skipped"] == "dry run"
    # A dry run's export is skipped; the reports task still builds the Data Docs.
    assert steps["validate"]["docs_built_on"].startswith("reports task, process ")
    assert "docs_error" not in steps["validate"]


def task_instances(home: Path, env: dict[str, str]) -> list[list[str]]:
    """Every task instance in the Airflow database: dag, task, run id and state."""
    code = (
        "import json; from sqlalchemy import select; "
        "from airflow.models.taskinstance import TaskInstance as TI; "
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    rows = s.execute(select(TI.dag_id, TI.task_id, TI.run_id, TI.state)).all()\n"
        "print(json.dumps(sorted([list(map(str, r)) for r in rows])))"
    )
    done = subprocess.run(
        [str(BIN / "python"), "-c", code],
        env=airflow_env(home, env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found: list[list[str]] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def test_invalid_params_are_refused_before_any_task(
    airflow_home: Path, env: dict[str, str], dataset: Path
) -> None:
    before = task_instances(airflow_home, env)
    conf = {"input_path": str(dataset), "batch_size": 0, "namespace": "refused"}
    done = dags_test(airflow_home, env, conf)
    assert done.returncode != 0
    assert "batch_size" in done.stdout + done.stderr
    # Refused by the form's schema: no task instance was created, none ran, and no run
    # folder (resolve's first act) exists.
    assert task_instances(airflow_home, env) == before
    assert not (Path(env["BATCHSCORE_HOME"]) / "runs" / "refused").exists()


def secrets_in(folder: Path, secret: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_the_trigger_form_cannot_read_connections(
    airflow_home: Path, env: dict[str, str], dataset: Path
) -> None:
    """Anyone who may trigger a run could put ``{{ conn.<id>.password }}`` in input_path
    and read it back from the log, the error and manifest.json; only date macros render."""
    secret = "topsecret"
    conn_env = env | {"AIRFLOW_CONN_SECRET_DB": f"postgresql://u:{secret}@h/db"}
    for template in (
        "/data/{{ conn.secret_db.password }}",
        "/data/{{ conn.secret_db.get_uri() }}",
        "/data/{{ ds.__class__.__mro__ }}",
    ):
        done = dags_test(airflow_home, conn_env, {"input_path": template, "namespace": "leak"})
        output = done.stdout + done.stderr
        assert done.returncode != 0, output[-3000:]
        assert secret not in output
        assert "input_path" in output and "ds, ds_nodash" in output, output[-3000:]
    home = Path(env["BATCHSCORE_HOME"])
    assert not list(home.rglob("manifest.json"))
    assert secrets_in(home, secret.encode()) == []
    assert secrets_in(airflow_home, secret.encode()) == []


def test_the_trigger_form_refuses_namespaces_outside_the_rule(
    airflow_home: Path, env: dict[str, str], dataset: Path
) -> None:
    home = Path(env["BATCHSCORE_HOME"])
    for bad in ("..", "a..b", ".hidden"):
        done = dags_test(airflow_home, env, {"input_path": str(dataset), "namespace": bad})
        assert done.returncode != 0, bad
        assert "namespace" in done.stdout + done.stderr
    assert not home.exists() or [p.name for p in home.iterdir()] in ([], ["runs"])
