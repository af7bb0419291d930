"""The run's record, ``manifest.json`` in the run folder.

Every step reads it, does its work and writes it back (atomically, by rename),
so a step needs only the run folder: that is all XCom carries between tasks. The run
folder is a local path or an object-store URL (``BATCHSCORE_OUTPUT_DIR=s3://...``,
``batchscore.core.storage``): on a store the manifest is replaced by one whole object.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from batchscore.core import storage
from batchscore.core.urls import public_url, split_password
from jobs.errors import RunError

MANIFEST = "manifest.json"
# A passing run's reports (GX Data Docs, the drift plot) left by the DAG's validate task to
# its reports task (``jobs.data_docs``): the validate step's ``docs_built_on`` until they
# are built. That task records them beside the step's job (``docs_job``), not in the
# manifest (see ``_read_docs_record``); the run's end in MLflow marks itself there too, so
# that one of the two logs them (``jobs.tracking``).
DOCS_LATER = "reports task"
DOCS_RECORD = "docs-record.json"
DOCS_RUN_ENDED = "docs-run-ended"


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
    dashboard: bool | None = None  # None: scoring.engine.dashboard_address decides
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    prefetch_row_groups: int | None = None  # None: scoring.engine.prefetch_depth decides
    max_failed_shards: int = 0
    keep_versions: int = 2
    dry_run: bool = False
    force: bool = False  # re-score existing parts, publish past the drift gate and out of order
    # What the run's data is as of: a DAG run's logical date; unset, the run's created_at.
    # Versions go live in this order (kv_export.store.VersionOrder).
    data_as_of: str | None = None
    max_feature_null_rate: float = 0.0
    quality_config: str | None = None
    drift: dict[str, Any] = Field(default_factory=dict)  # scoring.quality.DriftRules defaults
    # Per-part expectations at the end of each shard's task on its worker; off: the
    # validate step checks every part on a cluster of its own (docs/quality.md).
    check_parts_in_score: bool = True
    # Publish as a canary answering this share (%) of the keys beside the live version
    # (``batchscore run --canary``, a job config's canary); None: publish (flip live).
    canary_percent: float | None = None

    @field_validator("input_path")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        """An input URL with a key and secret in it is refused before it is written."""
        if storage.carries_secret(value):
            from scoring.errors import InputAccessDenied

            raise InputAccessDenied(
                f"Input URL {storage.public(value)} carries credentials",
                expected="a URL without a key or secret",
                fix="Give credentials as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                "AWS_PROFILE (for S3); a URL is written to the run's manifest and logs",
            )
        return value

    @field_validator("store_url")
    @classmethod
    def _no_password(cls, value: str) -> str:
        """Parameters are written to manifest.json and shown in logs: never a secret."""
        if split_password(value)[1] is not None:
            # Not a ValueError: pydantic would quote the input, secret included.
            raise RunError(
                f"Store URL {public_url(value)} carries a password",
                expected="a store URL without one",
                fix="Give the password as BATCHSCORE_STORE_PASSWORD",
            )
        return value


class ModelRecord(BaseModel):
    """The run's model pin (``registry.mlflow_registry.ModelPin``): ``uri`` is concrete.

    ``version`` is the registered version for ``source`` "registry", the logged model's
    id (``m-...``) for "logged_model", the run's id for "run"; every step uses ``uri``
    and ``local_dir``, never ``requested`` again.
    """

    name: str
    version: str
    uri: str
    requested: str
    alias: str | None = None
    source: Literal["registry", "logged_model", "run"] = "registry"
    model_id: str | None = None  # the MLflow 3 logged model behind it, when there is one
    source_run_id: str | None = None  # the MLflow run that produced the model, when known
    local_dir: str
    flavor: str
    serialization: str | None
    signature_kind: str
    features: list[str]
    # None: resolved before the types were recorded (the plan step reads the MLmodel)
    feature_types: dict[str, str] | None = None
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


class StoreRecord(BaseModel):
    """What the run did in one store: the version it exported there and whether it went live.

    A run aimed at another store exports and publishes there too; aimed at the same
    store again, it publishes nothing twice.
    """

    store: str  # the store's URL without secrets (kv_export.connect.public_url)
    version: int | None = None
    keys: int | None = None
    exported_at: str | None = None
    published: bool = False
    published_at: str | None = None


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
    stores: dict[str, StoreRecord] = Field(default_factory=dict)  # by store label
    # The MLflow run that records this scoring run (jobs.tracking); None when not recorded.
    mlflow_run_id: str | None = None
    # The step whose failure marked the MLflow run FAILED; a retry that succeeds clears it.
    mlflow_failed_step: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _per_store_record(cls, data: Any) -> Any:
        """A manifest written before runs kept a record per store: its version and
        publish belong to the store its parameters name."""
        if not isinstance(data, dict) or "version" not in data:
            return data
        data = dict(data)
        legacy = {k: data.pop(k) for k in ("version", "published", "published_at") if k in data}
        store = public_url(data["params"]["store_url"])
        stores = dict(data.get("stores") or {})
        stores.setdefault(store, {"store": store, **legacy})
        return data | {"stores": stores}

    @property
    def store(self) -> str:
        """The label of the store this run's parameters name (no secrets)."""
        return public_url(self.params.store_url)

    def store_record(self) -> StoreRecord:
        """The run's record in its current store, created when the run first meets it."""
        return self.stores.setdefault(self.store, StoreRecord(store=self.store))

    @property
    def version(self) -> int | None:
        """The version this run exported to its current store."""
        found = self.stores.get(self.store)
        return found.version if found else None

    @property
    def published(self) -> bool:
        """Whether this run went live in its current store (once; never again there)."""
        found = self.stores.get(self.store)
        return found.published if found else False

    @property
    def path(self) -> Path:
        """The manifest's local path (a run folder on an object store: see ``location``)."""
        return Path(self.run_dir) / MANIFEST

    @property
    def location(self) -> str:
        """The manifest's path or URL."""
        return storage.join(self.run_dir, MANIFEST)

    @property
    def parts_dir(self) -> str:
        """The folder (or prefix) of the output parts: ``storage.join`` it with a name."""
        return storage.join(self.run_dir, "parts")

    @property
    def data_as_of(self) -> str:
        """Where the run's version stands in the namespace's order."""
        return self.params.data_as_of or self.created_at

    def save(self) -> None:
        """Durably: the file is synced before the rename and the folder after it, so a
        power loss leaves the old manifest or the new one, never an empty file; on an
        object store the whole document is one object, replaced in one request."""
        storage.put_bytes(self.location, self.model_dump_json(indent=2).encode())

    def record_step(self, step: str, **details: Any) -> None:
        self.steps[step] = {"finished_at": utcnow(), **details}

    def summary(self) -> dict[str, Any]:
        """The ``--summary-json`` document."""
        return {
            "run_id": self.run_id,
            "namespace": self.namespace,
            "model": {
                "name": self.model.name,
                "version": self.model.version,
                "serialization": self.model.serialization,  # pickle: registry code ran
            },
            "rows": self.input.rows if self.input else 0,
            "store": self.store,
            "version": self.version,
            "published": self.published,
            "stores": {label: r.model_dump() for label, r in self.stores.items()},
            "failed_shards": [
                {"id": s.id, "rows": s.rows, "error": s.error}
                for s in self.shards
                if s.state == "failed"
            ],
            "dry_run": self.params.dry_run,
            # A shadow run's candidate (jobs.shadow): never published, compared instead.
            "shadow": self.steps.get("shadow", {}).get("candidate"),
            "run_dir": self.run_dir,
            "mlflow_run_id": self.mlflow_run_id,
            "dashboard": self.steps.get("score", {}).get("dashboard"),  # the Dask dashboard
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
    location = storage.join(run_dir, MANIFEST)
    try:
        document = storage.read_bytes(location)
    except FileNotFoundError:
        document = None
    except OSError as exc:
        if storage.failure(exc) != "not_found":
            raise RunError(
                f"Run folder {storage.public(run_dir)} could not be read",
                found=f"{type(exc).__name__}: {exc}",
                fix="Check the object store's credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) "
                "and endpoint (AWS_ENDPOINT_URL)",
            ) from None
        document = None
    if document is None:
        raise RunError(
            f"Run folder {storage.public(run_dir)} has no {MANIFEST}",
            expected="a folder created by the resolve step",
            fix="Run the resolve step (or the whole pipeline) first",
        )
    manifest = Manifest.model_validate_json(document)
    _read_docs_record(manifest)
    return manifest


def _read_docs_record(manifest: Manifest) -> None:
    """Merge the DAG's reports task's record into the steps whose reports it made, where
    every reader looks for it (the validate step's ``docs_built_on``, ``docs_seconds``,
    ``docs_error``; the drift step's ``plot_seconds``, ``plot_error``; a report that failed
    is dropped). That task runs beside the export task, and both rewriting this one
    document would lose one of their updates, so it writes its record to a file of its
    own beside the Data Docs job (a run folder on this host: a run folder on an object
    store has its reports made by the validate step). Only a step that left a job has
    one to look for."""
    step = manifest.steps.get("validate")
    job = step.get("docs_job") if step else None
    if not job:
        return
    try:
        record = json.loads(Path(job).with_name(DOCS_RECORD).read_text())
    except FileNotFoundError:
        return
    for name, fields in record.items():
        manifest.steps.setdefault(name, {}).update(fields)
    if "docs_error" in record.get("validate", {}):
        manifest.reports.pop("data_docs", None)
    if "plot_error" in record.get("drift", {}):
        manifest.reports.pop("distributions_png", None)
