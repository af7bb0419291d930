"""A job config's staged publish (``canary``): what it accepts, what it refuses, and the
tasks it adds to the DAG (publish as a canary → a deferred hold → check and settle)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.unit.test_dag_config import GOOD, dag_modules, problems_of, write  # noqa: F401

STAGED = {"percent": 10, "hold": "2h", "max_mean_drift": 0.05}


def test_a_canary_job_becomes_a_staged_dag(
    dag_modules: dict[str, ModuleType],  # noqa: F811
    tmp_path: Path,
) -> None:
    config, pipeline = dag_modules["config"], dag_modules["pipeline"]
    data = yaml.safe_load(GOOD) | {"canary": STAGED}
    write(tmp_path, "daily.yaml", yaml.safe_dump(data))
    (job,) = config.load_jobs(tmp_path).jobs
    canary = job.config.canary
    assert canary.percent == 10 and canary.hold == timedelta(hours=2)
    assert canary.rules() == {"max_mean_drift": 0.05, "min_answers": 0}
    dag = pipeline.build_dag(pipeline.job_spec(job))
    hold = dag.get_task("hold_canary")
    assert type(hold).__name__ == "DateTimeSensorAsync"  # deferred: waits in the triggerer
    assert "hold_until" in hold.target_time
    assert hold.upstream_task_ids == {"publish"}  # the publish names when the hold ends
    assert dag.get_task("settle_canary").upstream_task_ids == {"publish", "hold_canary"}
    plain = yaml.safe_load(GOOD)
    write(tmp_path, "daily.yaml", yaml.safe_dump(plain))
    (job,) = config.load_jobs(tmp_path).jobs
    assert "hold_canary" not in pipeline.build_dag(pipeline.job_spec(job)).task_ids


@pytest.mark.parametrize(
    ("canary", "field", "expected"),
    [
        ({"percent": 0}, "canary.percent", "greater than 0"),
        ({"percent": 100}, "canary.percent", "less than 100"),
        ({"percent": 10.001}, "canary.percent", "steps of 0.01"),
        ({"percent": 10, "hold": "soon"}, "canary.hold", "a duration such as"),
        ({"percent": 10, "max_error_rate": 0.01}, "canary", "expected the lookup API's URL"),
        ({"percent": 10, "api_url": "lookup:8000"}, "canary.api_url", "http://host:port"),
        ({"percent": 10, "hold_for": "1h"}, "canary.hold_for", "unknown"),
    ],
)
def test_a_bad_canary_is_named_with_its_field(
    dag_modules: dict[str, ModuleType],  # noqa: F811
    tmp_path: Path,
    canary: dict[str, Any],
    field: str,
    expected: str,
) -> None:
    data = yaml.safe_load(GOOD) | {"canary": canary}
    write(tmp_path, "daily.yaml", yaml.safe_dump(data))
    [problem] = problems_of(dag_modules["config"], tmp_path)
    assert f"field '{field}'" in problem and expected in problem, problem


def test_a_shadow_job_cannot_stage_a_publish(
    dag_modules: dict[str, ModuleType],  # noqa: F811
    tmp_path: Path,
) -> None:
    data = yaml.safe_load(GOOD) | {"canary": STAGED, "shadow": "challenger"}
    write(tmp_path, "daily.yaml", yaml.safe_dump(data))
    [problem] = problems_of(dag_modules["config"], tmp_path)
    assert "field 'canary'" in problem and "never publishes" in problem


def test_a_publish_refused_by_a_running_canary_fails_at_once(
    dag_modules: dict[str, ModuleType],  # noqa: F811
) -> None:
    """Retrying cannot end someone's canary: the task fails at once, saying to promote or
    abort it (evaluated after the scheduler's serialisation round trip too)."""
    from airflow.sdk import ExceptionRetryPolicy, RetryAction

    from kv_export.errors import CanaryRefused, StoreUnavailable

    policy = dag_modules["pipeline"].RETRY_POLICY
    for evaluated in (policy, ExceptionRetryPolicy.deserialize(policy.serialize())):
        refused = CanaryRefused("Namespace 'ns' has a canary running")
        assert evaluated.evaluate(refused, try_number=1, max_tries=3).action == RetryAction.FAIL
        down = StoreUnavailable("Redis did not answer")
        assert evaluated.evaluate(down, try_number=1, max_tries=3).action == RetryAction.DEFAULT
