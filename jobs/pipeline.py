"""``batchscore run``'s entry point, kept for its callers: the run is ``jobs.flow.run_flow``."""

from __future__ import annotations

from jobs.flow import run_flow as run_pipeline

__all__ = ["run_pipeline"]
