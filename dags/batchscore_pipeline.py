"""Score a Parquet dataset with the registry's model and publish it to the lookup store.

The ad-hoc ``batchscore`` Airflow DAG: no schedule, everything comes from the trigger form
(input path, model URI, key column, namespace, store, batch size, shadow candidate,
dry run, force). Scheduled jobs are DAGs of their own, generated from job configs by
``batchscore_jobs.py``; both are built by ``batchscore_dags.pipeline.build_dag``, so
they run the same tasks: resolve → plan → score → validate → export → publish.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

# Make this folder's helpers importable for every DAG parser: the DAG processor puts the
# DAGs folder on sys.path, a plain DagBag (`airflow dags list --local`) does not. Appended,
# so installed packages keep precedence (the top-level `jobs` package over dags/jobs/).
if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))

from batchscore_dags.pipeline import DagSpec, FormDefaults, build_dag

batchscore = build_dag(
    DagSpec(
        dag_id="batchscore",
        description=__doc__.splitlines()[0],
        doc_md=__doc__,
        form=FormDefaults(),
        retries=1,
        retry_delay=timedelta(seconds=20),
        # No schedule, so nothing runs until someone triggers it: unpaused from the start,
        # also where new DAGs start paused (docker-compose.yaml).
        paused_upon_creation=False,
    )
)
