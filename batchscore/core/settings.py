"""Settings, one class per deployable, built once at startup and passed in.

``RunSettings`` is for whatever runs the pipeline (CLI, Airflow tasks);
``ApiSettings`` for the lookup API. Both read ``BATCHSCORE_*`` variables; a
``BATCHSCORE_*`` variable that no class knows is rejected, so a typo fails loudly
instead of being ignored. ``MLFLOW_TRACKING_URI`` is read under MLflow's own name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from batchscore.core.errors import SettingsError

ENV_PREFIX = "BATCHSCORE_"
SCHEDULER_SCHEMES = ("tcp://", "tls://")
CLUSTERS_STARTED = ("local", "processes", "cuda", "auto")  # started for a run, not addresses


def is_running_cluster(cluster: str) -> bool:
    """``cluster`` is an existing scheduler's address, whose workers outlive the run,
    rather than a cluster started for it (local, processes, cuda, auto)."""
    return cluster.startswith(SCHEDULER_SCHEMES)


class _Common(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    home: Path = Field(
        default=Path(".batchscore"),
        description="Where the embedded defaults live: MLflow store, KV store, run outputs.",
    )
    store_url: str | None = Field(
        default=None,
        description="KV store: lmdb:///path (embedded, the default), redis://host:port/db or "
        "redis+cluster://host:port,host:port/ (rediss:// and rediss+cluster:// for TLS).",
    )
    store_password: str | None = Field(
        default=None,
        repr=False,
        description="Redis password when the store URL carries none (the URL's wins).",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines as text, or as one JSON object per line (for log shippers).",
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_variables(cls, data: Any) -> Any:
        known = {f"{ENV_PREFIX}{name}".upper() for name in _all_field_names()}
        unknown = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known)
        if unknown:
            raise ValueError(
                f"unknown setting {', '.join(unknown)}; known settings are "
                f"{', '.join(sorted(known))}"
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def _password_out_of_the_url(cls, data: Any) -> Any:
        """A password in the store URL moves to ``store_password`` (the URL's wins, as
        always): from here on the URL can be shown, recorded and sent anywhere."""
        from batchscore.core.urls import split_password

        if not isinstance(data, dict) or not isinstance(data.get("store_url"), str):
            return data
        url, password = split_password(data["store_url"])
        if password is None:
            return data
        return data | {"store_url": url, "store_password": password}

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"lmdb://{self.home / 'store'}"


class RunSettings(_Common):
    """Settings of a pipeline run (CLI ``batchscore run`` and the Airflow tasks)."""

    output_dir: str | None = Field(
        default=None,
        description="Root of run folders: a path, or an object-store URL (s3://bucket/runs, "
        "reached with the AWS variables or profile); default HOME/runs.",
    )
    workers: int = Field(default=2, ge=1, le=1024, description="Dask worker processes.")
    threads_per_worker: int = Field(default=1, ge=1, le=256)
    batch_size: int | Literal["auto"] = Field(
        default="auto", description="Rows per forward pass, or 'auto': the largest that fits."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where workers run the model; auto: the worker's GPU if any."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Autocast precision of the forward pass."
    )
    prefetch_row_groups: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="Row groups a worker decodes ahead of the forward pass; unset: 2 on a "
        "GPU, 0 on CPU (raise it for CPU workers that leave cores idle).",
    )
    max_failed_shards: int = Field(
        default=0, ge=0, description="Shards allowed to fail before the run fails."
    )
    shard_rows: int = Field(
        default=250_000, ge=1, description="Target rows per shard (row groups are packed)."
    )
    cluster: str = Field(
        default="local",
        description="local (in this process, a thread per shard at once), processes (a "
        "LocalCluster of worker processes), cuda (dask-cuda), auto (cuda with a GPU, else "
        "local), or a running scheduler's tcp:// address.",
    )
    dashboard: bool | None = Field(
        default=None,
        description="The Dask dashboard of a cluster started for the run. Unset: on for "
        "worker processes (processes, cuda), off for the in-process local cluster, whose "
        "dashboard costs about 0.7 s of a run's score step (bokeh's import and set-up). A "
        "running cluster's dashboard is its own.",
    )
    keep_versions: int = Field(
        default=2, ge=1, description="Published versions kept per namespace."
    )
    version_ttl_seconds: int | None = Field(
        default=None,
        ge=0,
        description="Set the namespace's TTL at export: versions expire this long after "
        "loading (0: no TTL; unset: keep the namespace's current TTL).",
    )
    export_on_workers: bool = Field(
        default=False,
        description="With a tcp:// scheduler as cluster, Dask workers export their own parts.",
    )
    loading_grace_seconds: int = Field(
        default=3600,
        ge=0,
        description="A version still loading this long after its export began is an orphan "
        "of a crashed export: the collection after each publish deletes it. Set it above "
        "your longest export.",
    )
    keep_run_days: float = Field(
        default=7.0,
        ge=0,
        description="Run folders (parts, model copy) not needed by a version the store keeps "
        "are deleted this many days after their last change, by the collection after a "
        "publish.",
    )
    gc_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Time the collection after a publish may spend deleting old versions; "
        "what is left is deleted by the next one.",
    )
    check_parts_in_score: bool = Field(
        default=True,
        description="Check each part against the per-part expectations as it is written "
        "(off: the validate step checks every part).",
    )
    max_feature_null_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Largest share of nulls in a feature column of any input file (0: none).",
    )
    quality_config: Path | None = Field(
        default=None,
        description="YAML/JSON file of per-namespace expectations and drift thresholds.",
    )
    drift_metric: Literal["psi", "ks"] = Field(
        default="ks", description="Distribution distance of the drift gate: ks or psi."
    )
    drift_max_distance: float = Field(
        default=0.5, ge=0.0, description="Largest KS statistic (or PSI) against the live version."
    )
    drift_moved_delta: float = Field(
        default=0.5, ge=0.0, description="A key 'moved' when its prediction changed by more."
    )
    drift_max_moved_share: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Largest share of keys that may move."
    )
    drift_sample_rows: int = Field(
        default=200_000, ge=100, description="Rows sampled per run for the drift gate."
    )
    allow_pickle: bool | None = Field(
        default=None,
        description="Load pickled models (PyTorch pickle, pyfunc cloudpickle): unpickling runs "
        "code from the registry on the workers. Unset: MLflow's own "
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION (MLflow's default: true).",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "mlflow_tracking_uri"),
        description="MLflow tracking URI; default sqlite:///HOME/mlflow.db.",
    )
    mlflow_registry_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_REGISTRY_URI", "mlflow_registry_uri"),
        description="MLflow model registry URI when it differs from the tracking URI.",
    )
    mlflow_experiment: str | None = Field(
        default=None,
        description="MLflow experiment that records scoring runs; default batchscore/<namespace>.",
    )
    mlflow_runs: bool = Field(
        default=True,
        description="Record every scoring run as an MLflow run (params, metrics, artifacts).",
    )
    pushgateway_url: str | None = Field(
        default=None,
        description="Prometheus Pushgateway to push each run's figures to, e.g. "
        "http://pushgateway:9091 (a user and password in the URL go as basic auth).",
    )
    metrics_textfile_dir: Path | None = Field(
        default=None,
        description="Folder of node-exporter's textfile collector: each run writes "
        "batchscore_<namespace>.prom there.",
    )

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_value(cls, value: Any) -> Any:
        """A path (the CLI's --output) or a URL, kept as text; a local one made absolute."""
        if value is None or "://" in str(value):
            return value
        return str(Path(value).expanduser().absolute())

    @field_validator("cluster")
    @classmethod
    def _cluster_value(cls, value: str) -> str:
        if value not in CLUSTERS_STARTED and not is_running_cluster(value):
            raise ValueError(
                "expected local, processes, cuda, auto or a scheduler address like tcp://host:8786"
            )
        return value

    @field_validator("pushgateway_url")
    @classmethod
    def _pushgateway_value(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("expected an http:// or https:// URL like http://pushgateway:9091")
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size_value(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and value < 1:
            raise ValueError("expected a positive number of rows or 'auto'")
        return value

    @property
    def batch_rows(self) -> int:
        """The batch size as run parameters carry it: 0 means auto."""
        return 0 if self.batch_size == "auto" else int(self.batch_size)

    @property
    def runs_dir(self) -> Path:
        """The local root of run folders (``runs_location`` is the one a run writes to)."""
        if self.output_dir and "://" not in self.output_dir:
            return Path(self.output_dir).expanduser().absolute()
        return self.home / "runs"

    @property
    def runs_location(self) -> str:
        """Where runs write their folders: ``output_dir``'s URL, or ``runs_dir``."""
        if self.output_dir and "://" in self.output_dir:
            return self.output_dir.rstrip("/")
        return str(self.runs_dir)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"


class ApiSettings(_Common):
    """Settings of the lookup API (``batchscore serve``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    live_cache_seconds: float = Field(
        default=1.0, ge=0, description="How long the live-version pointer is cached."
    )
    store_timeout_seconds: float = Field(default=0.5, gt=0, description="Socket timeout to Redis.")
    max_batch_keys: int = Field(
        default=1000, ge=1, le=100_000, description="Most keys in one batch request."
    )
    batch_fallback: bool = Field(default=True, description="Answer from the run's Parquet output.")
    stale_fallback: bool = Field(
        default=False,
        description="Answer keys the live version lacks from the previous published version "
        "(marked stale).",
    )
    max_key_length: int = Field(default=256, ge=1, le=4096, description="Longest key accepted.")
    api_workers: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes.")
    api_keys: dict[str, list[str]] | None = Field(
        default=None,
        description='API keys and the namespaces each may read, JSON: {"key": ["ns", ...]}; '
        '"*" means every namespace. Neither this nor a keys file set: authentication is off '
        "(logged at start); set but holding no key: the API refuses to start.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="File of API keys, one 'key: ns1,ns2' (or 'key: *') a line."
    )
    rate_limit_per_second: float = Field(
        default=0, ge=0, description="Requests per second per API key (0: no limit)."
    )
    rate_limit_burst: int = Field(
        default=0, ge=0, description="Token bucket size; 0: one second's worth."
    )
    auth_failures_per_minute: int = Field(
        default=20,
        ge=0,
        description="Failed authentications allowed per client address: a bucket of this many, "
        "refilled over a minute; an address that emptied it gets 429 with Retry-After, right "
        "key or not, until it refills (0: no limit).",
    )
    max_body_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Largest request body; unset: what max_batch_keys keys of max_key_length "
        "characters take as JSON. A larger body gets 413 before it is read.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty: CORS off."
    )
    breaker_failures: int = Field(
        default=3, ge=1, description="Consecutive store failures that open the circuit breaker."
    )
    breaker_reset_seconds: float = Field(
        default=2.0, gt=0, description="How long the breaker stays open before one probe."
    )
    fallback_cache_row_groups: int = Field(
        default=256, ge=1, description="Decoded batch-output row groups kept for the fallback."
    )
    fallback_memory_bytes: int = Field(
        default=256 << 20,
        ge=1 << 20,
        description="Decoded batch output the fallback holds at once, all requests together: "
        "half for the cache of row groups, half for decodes in flight, one request at most an "
        "eighth (a row group larger than that is decoded alone).",
    )
    access_log: bool = Field(default=True, description="One JSON line per request on stderr.")

    @property
    def body_limit(self) -> int:
        """``max_body_bytes``, or a batch of the longest keys as JSON (quotes, comma, space)
        plus a kilobyte for the rest of the document."""
        return self.max_body_bytes or self.max_batch_keys * (self.max_key_length + 4) + 1024


class DagSettings(_Common):
    """Settings of the DAG files (read when Airflow parses them, so kept to paths)."""

    dag_jobs_dir: Path | None = Field(
        default=None,
        description="Folder of job configs (*.yaml), one generated DAG each; default dags/jobs/.",
    )


S = TypeVar("S", bound="_Common")


def _all_field_names() -> set[str]:
    names: set[str] = set()
    for cls in (RunSettings, ApiSettings, DagSettings):
        names.update(cls.model_fields)
    return names - {"mlflow_tracking_uri"}


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings, turning pydantic's report into one message per bad value."""
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if not err["loc"]:
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            variable = ENV_PREFIX + ".".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{variable}={err.get('input')!r}: {err['msg']}")
        raise SettingsError(
            "Invalid settings",
            found="; ".join(problems),
            fix="Correct the BATCHSCORE_* environment variables or the command-line options",
        ) from None
