"""The DAG layer's own error: a job config that cannot become a DAG.

Everything a task raises comes from ``jobs``, ``scoring``, ``registry`` or ``kv_export``
(the tree is drawn in ``batchscore/core/errors.py``).
"""

from __future__ import annotations

from batchscore.core.errors import BatchscoreError


class JobConfigError(BatchscoreError):
    """One or more job configs cannot become DAGs."""
