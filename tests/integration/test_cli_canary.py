"""Staged publishing through the real ``batchscore`` script (issue 21): ``run --canary``,
``step publish --canary``, ``canary NS --to/--promote/--abort``, ``status`` with the
canary's share of the lookup API's answers, and the bad inputs that leave the state as
it was."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from jobs.manifest import load_manifest
from kv_export.encoding import canary_slot
from tests.conftest import KEY, run_cli
from tests.integration.test_api_service import Start
from tests.integration.test_quality_gates import variants  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS = "staged"


def cli_json(*args: str, env: dict[str, str]) -> dict:
    done = run_cli(*args, "-o", "json", env=env)
    assert done.returncode == 0, done.stderr
    document: dict = json.loads(done.stdout)
    return document


def run(dataset: Path, model: str, env: dict[str, str], *extra: str) -> tuple[int, str, str]:
    done = run_cli(
        *("run", "--input", str(dataset), "--model", model, "--key-column", KEY),
        *("--namespace", NS, *extra),
        env=env,
    )
    return done.returncode, done.stdout, " ".join(done.stderr.split())


def test_a_canary_is_started_moved_aborted_restarted_and_promoted_from_the_cli(
    env: dict[str, str],
    dataset: Path,
    tmp_path: Path,
    start_api: Start,
    variants: dict[str, str],  # noqa: F811
) -> None:
    code, _, err = run(dataset, "models:/churn/1", env, "--canary", "10%")
    assert code == 3 and "has no live version to canary" in err, err  # nothing to stage against
    assert cli_json("status", NS, env=env)["canary"] is None
    code, out, err = run(dataset, "models:/churn/1", env)  # the same run: its version 1 now
    assert code == 0 and "published" in out, err

    code, out, err = run(dataset, variants["churn_small"], env, "--canary", "10%")
    assert code == 0, err
    assert "canary at 10 %, not live" in " ".join(out.split())
    status = cli_json("status", NS, env=env)
    assert status["live"] == 1 and status["canary"]["version"] == 2
    assert status["canary"]["percent"] == 10
    shown = " ".join(run_cli("status", NS, env=env).stdout.split())
    assert "canary version 2 at 10 % of the keys beside live version 1" in shown, shown
    canary_run = next(Path(r["output_dir"]).parent for r in status["versions"] if r["version"] == 2)

    # Bad input: a share outside (0, 100), a second canary, promote/abort with none.
    for bad in ("0", "100%", "150%", "ten"):
        done = run_cli("canary", NS, "--to", bad, env=env)
        assert done.returncode == 2 and "percentage" in done.stderr, (bad, done.stderr)
    assert run_cli("canary", NS, "--promote", "--abort", env=env).returncode == 2
    code, _, err = run(dataset, "models:/churn/2", env, "--force", "--canary", "20%")
    assert code == 3 and "has a canary running (version 2 at 10 %" in err, err
    assert cli_json("canary", NS, env=env)["canary"]["version"] == 2

    # The lookup API answers the canary's share from it; status reads the share back.
    api = start_api(env, f"lmdb://{tmp_path / 'home' / 'store'}")
    keys = [str(k) for k in range(1_000_000, 1_012_000, 13)]
    answers = httpx.post(f"{api.base}/v1/predictions/{NS}/batch", json={"keys": keys}).json()
    in_canary = [canary_slot(k.encode()) < 1000 for k in keys]
    assert [r["canary"] for r in answers["results"]] == in_canary
    assert {r["status"] for r in answers["results"]} == {"found"}
    assert {r["version"] for r, c in zip(answers["results"], in_canary, strict=True) if c} == {2}
    status = cli_json("status", NS, "--api", api.base, env=env)
    share = status["answers"]["canary_share"]
    assert share == pytest.approx(sum(in_canary) / len(keys))
    assert status["answers"]["canary"]["not_found_rate"] == 0
    shown = " ".join(run_cli("status", NS, "--api", api.base, env=env).stdout.split())
    assert f"canary's share of answers: {share:.1%}" in shown, shown

    moved = cli_json("canary", NS, "--to", "50%", env=env)
    assert (moved["live"], moved["canary"], moved["percent"]) == (1, 2, 50)
    drift = cli_json("canary", NS, "--drift", env=env)["drift"]
    assert drift["keys"] > 1000 and drift["outputs"] == ["churn_probability"]
    assert 0 < drift["max_abs_diff"] < 0.5

    aborted = cli_json("canary", NS, "--abort", env=env)
    assert (aborted["live"], aborted["canary"]) == (1, None)
    record = load_manifest(canary_run)
    assert not record.published and record.steps["publish"]["note"].startswith("canary aborted")
    for args in (["--abort"], ["--promote"], ["--to", "20%"]):
        done = run_cli("canary", NS, *args, env=env)
        assert done.returncode == 3 and "no canary running" in done.stderr, done.stderr
    assert "no canary; live version 1" in " ".join(run_cli("canary", NS, env=env).stdout.split())

    restarted = run_cli("step", "publish", str(canary_run), "--canary", "5%", env=env)
    assert restarted.returncode == 0, restarted.stderr
    assert json.loads(restarted.stdout)["canary"] == 5
    promoted = cli_json("canary", NS, "--promote", env=env)
    assert (promoted["live"], promoted["canary"]) == (2, None)
    status = cli_json("status", NS, env=env)
    assert status["live"] == 2 and status["kept"] == [1, 2] and status["canary"] is None
    assert load_manifest(canary_run).published  # the run went live, once
    again = run_cli("step", "publish", str(canary_run), env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["newly_published"] is False
