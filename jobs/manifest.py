"""The run's record, ``manifest.json`` in the run folder.

Every step reads it, does its work and writes it back (atomically, by rename),
so a step needs only the run folder: that is all XCom carries between tasks.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.errors import RunError

MANIFEST = "manifest.json"


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def safe_run_id(raw: str) -> str:
    """A run id usable as a folder name: Airflow's ``manual__2026-...+00:00`` included."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._")
    if not cleaned:
        raise RunError(f"Run id '{raw}' has no usable characters", expected="letters or digits")
    return cleaned[:120]


class RunParams(BaseModel):
    input_path: str
    model_uri: str
    key_column: str
    namespace: str | None = None
    store_url: str
    features: list[str] | None = None
    batch_size: int  # 0: auto, the largest batch that fits the device
    workers: int
    threads_per_worker: int = 1
    shard_rows: int
    cluster: str = "local"
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    prefetch_row_groups: int | None = None  # None: scoring.engine.prefetch_depth decides
    max_failed_shards: int = 0
    keep_versions: int = 2
    dry_run: bool = False
    force: bool = False  # re-score existing parts, and publish past a failing drift gate
    max_feature_null_rate: float = 0.0
    quality_config: str | None = None
    drift: dict[str, Any] = Field(default_factory=dict)  # scoring.quality.DriftRules defaults
    # Per-part expectations at the end of each shard's task on its worker; off: the
    # validate step checks every part on a cluster of its own (docs/quality.md).
    check_parts_in_score: bool = True


class ModelRecord(BaseModel):
    name: str
    version: str
    uri: str
    requested: str
    alias: str | None = None
    local_dir: str
    flavor: str
    serialization: str | None
    signature_kind: str
    features: list[str]
    outputs: list[str] = Field(default_factory=list)


class InputRecord(BaseModel):
    root: str
    fingerprint: str
    rows: int
    files: int
    key_type: Literal["int", "string"]


class PieceRecord(BaseModel):
    path: str
    row_group_start: int
    row_group_end: int
    rows: int


class ShardRecord(BaseModel):
    id: int
    pieces: list[PieceRecord]
    rows: int
    part: str
    state: Literal["pending", "done", "failed"] = "pending"
    error: str | None = None
    seconds: float | None = None
    worker: str | None = None
    min_key: int | str | None = None
    max_key: int | str | None = None


class Manifest(BaseModel):
    run_id: str
    namespace: str
    run_dir: str
    created_at: str = Field(default_factory=utcnow)
    params: RunParams
    model: ModelRecord
    input: InputRecord | None = None
    shards: list[ShardRecord] = Field(default_factory=list)
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict)
    validation: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None
    reports: dict[str, str] = Field(default_factory=dict)  # name → path (Data Docs, plots)
    version: int | None = None
    published: bool = False
    published_at: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / MANIFEST

    @property
    def parts_dir(self) -> Path:
        return Path(self.run_dir) / "parts"

    def save(self) -> None:
        temporary = self.path.with_name(f".{MANIFEST}.{uuid.uuid4().hex}")
        temporary.write_text(self.model_dump_json(indent=2))
        os.replace(temporary, self.path)

    def record_step(self, step: str, **details: Any) -> None:
        self.steps[step] = {"finished_at": utcnow(), **details}

    def summary(self) -> dict[str, Any]:
        """The ``--summary-json`` document."""
        return {
            "run_id": self.run_id,
            "namespace": self.namespace,
            "model": {"name": self.model.name, "version": self.model.version},
            "rows": self.input.rows if self.input else 0,
            "version": self.version,
            "published": self.published,
            "failed_shards": [
                {"id": s.id, "rows": s.rows, "error": s.error}
                for s in self.shards
                if s.state == "failed"
            ],
            "dry_run": self.params.dry_run,
            "run_dir": self.run_dir,
            "validation": _validation_summary(self.validation),
            "drift": self.drift,
            "reports": self.reports,
            "steps": self.steps,
        }


def _validation_summary(validation: dict[str, Any] | None) -> dict[str, Any] | None:
    if validation is None:
        return None
    outcomes = validation.get("outcomes", [])
    return {
        "success": validation.get("success"),
        "expectations": len(outcomes),
        "failed": sum(1 for o in outcomes if not o.get("success")),
        "parts": validation.get("parts"),
        "failed_parts": validation.get("failed_parts", []),
    }


def load_manifest(run_dir: str | Path) -> Manifest:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise RunError(
            f"Run folder {run_dir} has no {MANIFEST}",
            expected="a folder created by the resolve step",
            fix="Run the resolve step (or the whole pipeline) first",
        )
    return Manifest.model_validate_json(path.read_text())
