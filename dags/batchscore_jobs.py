"""One Airflow DAG per batchscore job config: ``dags/jobs/<file>.yaml`` → DAG ``score_<name>``.

The folder is ``dags/jobs/`` unless ``BATCHSCORE_DAG_JOBS_DIR`` names another one. A
config that fails validation gets no DAG here; ``batchscore_job_configs.py`` reports it
as that file's import error (Airflow marks every DAG of a file with an import error
stale, so reporting it here would hide the valid jobs' DAGs too).
"""

from __future__ import annotations

import sys
from pathlib import Path

from airflow.sdk import get_parsing_context

# Make this folder's helpers importable for every DAG parser: the DAG processor puts the
# DAGs folder on sys.path, a plain DagBag (`airflow dags list --local`) does not. Appended,
# so installed packages keep precedence (the top-level `jobs` package over dags/jobs/).
if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))

from batchscore_dags.config import jobs_dir, load_jobs
from batchscore_dags.pipeline import build_dag, job_spec

_wanted = get_parsing_context().dag_id  # a task process needs its own DAG only
for _job in load_jobs(jobs_dir(Path(__file__).parent / "jobs")).jobs:
    if _wanted is None or _wanted == _job.config.dag_id:
        globals()[_job.config.dag_id] = build_dag(job_spec(_job))
