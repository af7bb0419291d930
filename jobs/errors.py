"""Run errors: ``RunError`` (a run folder that is missing, foreign or in the wrong state)."""

from __future__ import annotations

from batchscore.core.errors import BatchscoreError


class RunError(BatchscoreError):
    pass
