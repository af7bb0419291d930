"""Report invalid batchscore job configs as this file's Airflow DAG import error.

It defines no DAG. Each problem names the config file, the field, what was expected and
what was found; it shows in the UI's import errors and in ``airflow dags
list-import-errors``. The valid configs' DAGs come from ``batchscore_jobs.py`` and stay.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Make this folder's helpers importable for every DAG parser: the DAG processor puts the
# DAGs folder on sys.path, a plain DagBag (`airflow dags list --local`) does not. Appended,
# so installed packages keep precedence (the top-level `jobs` package over dags/jobs/).
if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))

from batchscore_dags.config import jobs_dir, load_jobs

load_jobs(jobs_dir(Path(__file__).parent / "jobs")).raise_for_problems()
