"""Job configs: one YAML file per scoring job, validated before any DAG is built from it.

A config says what to score (``model_uri``, an ``input_path`` template, ``key_column``),
where the predictions go (``namespace``, ``store_url``), when it runs (``schedule``: a
cron string, ``{asset: <uri>}`` or null) and how Airflow runs it (owner, retries,
``max_active_runs``, ``deadline``, ``execution_timeout`` for every step and ``timeouts``
per step), and who is told of a failed step or a blocked gate (``notify``). A ``shadow``
candidate turns every run of the job into a shadow run. Unknown fields are refused: a
typo fails parsing instead of being ignored. A problem is reported as ``<file>: field
'<name>': <what was expected>; found <value>``.

The folder is ``dags/jobs/`` next to the DAG files unless ``BATCHSCORE_DAG_JOBS_DIR``
names another one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from batchscore.core.names import NAMESPACE_RULE, is_namespace
from batchscore_dags.errors import JobConfigError

JOBS_DIR_VARIABLE = "BATCHSCORE_DAG_JOBS_DIR"
DAG_ID_PREFIX = "score_"
# The model URI forms a run pins (registry.uris parses them with MLflow's parsers; these
# patterns only shape-check them, so that parsing a DAG file never imports MLflow). They
# are JSON Schema patterns too (the trigger form): Python's and ECMAScript's regex alike.
REGISTERED_MODEL_URI_PATTERN = r"models:/(?P<name>[^/@]+)(/[0-9]+|/latest|@[\w-]+)"
LOGGED_MODEL_URI_PATTERN = r"models:/m-[\w-]+"
RUN_MODEL_URI_PATTERN = r"runs:/[\w-]+/\S+"
MODEL_URI_PATTERN = (
    f"^({REGISTERED_MODEL_URI_PATTERN.replace('?P<name>', '')}|{LOGGED_MODEL_URI_PATTERN}"
    f"|{RUN_MODEL_URI_PATTERN})$"
)
MODEL_URI = re.compile(MODEL_URI_PATTERN)
REGISTERED_MODEL_URI = re.compile(f"^{REGISTERED_MODEL_URI_PATTERN}$")
MODEL_URI_EXPECTED = (
    "models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest, "
    "models:/m-<model id> or runs:/<run id>/<artifact path>"
)
ALIAS = re.compile(r"^[\w-]+$")
NAME = r"^[A-Za-z0-9_.-]+$"
DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
DURATION_EXPECTED = "a duration such as 90s, 5m, 2h, 1h30m or a number of seconds"
EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
TIMEOUTS_EXAMPLE = "{score: 2h, validate: 20m}"
STORE_SCHEMES = ("lmdb", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)


def parse_duration(value: object) -> timedelta:
    """``90``, ``"90s"``, ``"5m"``, ``"2h"``, ``"1d"``, ``"1h30m"`` → timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return timedelta(seconds=value)
    if isinstance(value, str) and (match := DURATION.match(value.strip().lower())):
        if any(match.groups()):
            days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
            return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    raise ValueError(f"expected {DURATION_EXPECTED}")


class AssetSchedule(BaseModel):
    """Run whenever the asset gets an event (e.g. another job published its namespace)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    asset: str = Field(min_length=1, description="Asset URI, e.g. batchscore://features")


def positive_duration(value: object) -> timedelta:
    """``parse_duration``, refusing zero: a limit of nothing would fail every try."""
    duration = parse_duration(value)
    if duration <= timedelta(0):
        raise ValueError(
            f"expected a positive duration, {DURATION_EXPECTED.removeprefix('a duration ')}"
        )
    return duration


class StepTimeouts(BaseModel):
    """How long one try of each step may run (``execution_timeout``); unset: the job's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolve: timedelta | None = None
    plan: timedelta | None = None
    score: timedelta | None = None
    validate_: timedelta | None = Field(default=None, alias="validate")
    export: timedelta | None = None
    publish: timedelta | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return None if value is None else positive_duration(value)

    def of(self, step: str) -> timedelta | None:
        return getattr(self, "validate_" if step == "validate" else step)  # type: ignore[no-any-return]


class SmtpChannel(BaseModel):
    """Mail through one of Airflow's SMTP connections (host, port, login, TLS are there)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: list[str] = Field(min_length=1, description="Recipients.")
    from_: str | None = Field(
        default=None, alias="from", description="Sender; default: the connection's from_email."
    )
    conn_id: str = Field(default="smtp_default", min_length=1, description="Airflow connection.")

    @field_validator("to", mode="before")
    @classmethod
    def _to(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if not EMAIL.match(address):
                raise ValueError(f"expected mail addresses such as ops@example.com; {address!r}")
        return value


class NotifyConfig(BaseModel):
    """Who hears about a failed step (``failure``) and a blocked quality gate (``gate``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    when: list[Literal["failure", "gate"]] = Field(
        default=["failure", "gate"], min_length=1, description="The events to notify."
    )
    smtp: SmtpChannel

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, value: object) -> object:
        if isinstance(value, dict) and True in value:
            raise ValueError(
                "expected 'when: [failure, gate]' (YAML reads an unquoted 'on' as true)"
            )
        return value


class CanaryConfig(BaseModel):
    """A staged publish: the run's version answers ``percent`` % of the keys beside the
    live one for ``hold``, then is checked (drift from the live version on its keys; with
    ``api_url``, the lookup API's error and not-found rates for it) and promoted, or
    aborted when a bound does not hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    percent: float = Field(gt=0, lt=100, description="Share of the keys the canary answers.")
    hold: timedelta = Field(
        default=timedelta(hours=1), description="How long the canary runs before the check."
    )
    max_mean_drift: float | None = Field(
        default=None, ge=0, description="Largest mean |canary - live| on the canary's keys."
    )
    max_drift: float | None = Field(
        default=None, ge=0, description="Largest |canary - live| of any canary key."
    )
    api_url: str | None = Field(
        default=None, description="The lookup API's base URL, whose /metrics are read."
    )
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_not_found_rate: float | None = Field(default=None, ge=0, le=1)
    min_answers: int = Field(default=0, ge=0, description="Canary answers needed (api_url).")

    @field_validator("percent")
    @classmethod
    def _slots(cls, value: float) -> float:
        if abs(value * 100 - round(value * 100)) > 1e-6:
            raise ValueError("expected a percentage in steps of 0.01, such as 10 or 2.5")
        return value

    @field_validator("hold", mode="before")
    @classmethod
    def _hold(cls, value: object) -> object:
        return parse_duration(value)

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("expected the lookup API's base URL, http://host:port")
        return value

    @model_validator(mode="after")
    def _api_bounds(self) -> CanaryConfig:
        asks_api = (self.max_error_rate, self.max_not_found_rate) != (None, None)
        if (asks_api or self.min_answers) and self.api_url is None:
            raise ValueError(
                "field 'api_url': expected the lookup API's URL, since the canary's error, "
                "not-found or answer bounds are read from its /metrics; found none"
            )
        return self

    def rules(self) -> dict[str, object]:
        """``jobs.canary.CanaryRules``: the bounds that are set."""
        return self.model_dump(exclude={"percent", "hold"}, exclude_none=True)


class JobConfig(BaseModel):
    """One scoring job; the DAG ``score_<name>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME, max_length=200, description="The DAG is score_<name>.")
    description: str | None = None
    namespace: str | None = Field(
        default=None,
        description=f"Keyspace in the store ({NAMESPACE_RULE}); default: the model's name.",
    )
    model_uri: str = Field(description=MODEL_URI_EXPECTED)
    input_path: str = Field(
        min_length=1,
        description="Parquet file or folder; Airflow template, e.g. /data/churn/dt={{ ds }}; "
        "a relative path is under BATCHSCORE_HOME.",
    )
    key_column: str = Field(min_length=1)
    features: list[str] | None = Field(default=None, description="For tensor-signature models.")
    schedule: str | AssetSchedule | None = Field(
        default=None, description="Cron string, {asset: <uri>}, or null (manual only)."
    )
    store_url: str | None = Field(default=None, description="Default: BATCHSCORE_STORE_URL.")
    batch_size: int | None = Field(default=None, ge=1, description="Default: auto.")
    workers: int | None = Field(default=None, ge=1, le=1024, description="Dask workers.")
    owner: str = Field(default="batchscore", min_length=1)
    tags: list[str] = Field(default_factory=list)
    start_date: datetime = Field(default=DEFAULT_START, description="First logical date.")
    catchup: bool = False
    retries: int = Field(default=2, ge=0, le=20)
    retry_delay: timedelta = Field(default=timedelta(minutes=1))
    max_retry_delay: timedelta = Field(default=timedelta(hours=1))
    max_active_runs: int = Field(default=1, ge=1, le=64)
    deadline: timedelta | None = Field(
        default=None, description="Alert when a run is not done this long after it is queued."
    )
    shadow: str | None = Field(
        default=None, description="Candidate model: an alias of model_uri's model, or a URI."
    )
    execution_timeout: timedelta | None = Field(
        default=None,
        description="Longest one try of any step may run; then the try fails (and is retried).",
    )
    timeouts: StepTimeouts = Field(
        default_factory=StepTimeouts,
        description="Per step, over execution_timeout: {score: 2h, validate: 20m}.",
    )
    notify: NotifyConfig | None = Field(
        default=None,
        description="Mail on a failed step and a blocked gate: {when: [...], smtp: {to: ...}}.",
    )
    canary: CanaryConfig | None = Field(
        default=None,
        description="Stage the publish: {percent: 10, hold: 2h, max_mean_drift: 0.05}.",
    )

    @property
    def dag_id(self) -> str:
        return f"{DAG_ID_PREFIX}{self.name}"

    def step_timeouts(self, steps: tuple[str, ...]) -> dict[str, timedelta]:
        """Each step's ``execution_timeout``: its own, else the job's; absent: none."""
        found = {step: self.timeouts.of(step) or self.execution_timeout for step in steps}
        return {step: limit for step, limit in found.items() if limit is not None}

    @property
    def candidate(self) -> str | None:
        """``jobs.shadow.candidate_uri``'s answer, from the shapes validated here: that
        function parses with MLflow, which parsing a DAG file must not import."""
        if not self.shadow or MODEL_URI.match(self.shadow):
            return self.shadow or None
        registered = REGISTERED_MODEL_URI.match(self.model_uri)
        return f"models:/{registered['name']}@{self.shadow}" if registered else None

    @field_validator("model_uri")
    @classmethod
    def _model_uri(cls, value: str) -> str:
        if not MODEL_URI.match(value):
            raise ValueError(f"expected {MODEL_URI_EXPECTED}")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and not is_namespace(value):
            raise ValueError(f"expected a namespace: {NAMESPACE_RULE}")
        return value

    @field_validator("shadow")
    @classmethod
    def _shadow(cls, value: str | None) -> str | None:
        if value is not None and not (MODEL_URI.match(value) or ALIAS.match(value)):
            raise ValueError(
                f"expected an alias of the job's model (e.g. challenger) or {MODEL_URI_EXPECTED}"
            )
        return value

    @field_validator("features", mode="before")
    @classmethod
    def _features(cls, value: object) -> object:
        if isinstance(value, str):
            return [f.strip() for f in value.split(",") if f.strip()]
        return value

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        if value is None or isinstance(value, AssetSchedule):
            return value
        if isinstance(value, dict):
            try:
                return AssetSchedule.model_validate(value)
            except ValidationError:
                raise ValueError("expected {asset: <asset uri>} and nothing else") from None
        if isinstance(value, str) and value.strip():
            return _cron(value.strip())
        raise ValueError("expected a cron string such as '0 2 * * *', {asset: <uri>} or null")

    @field_validator("start_date", mode="before")
    @classmethod
    def _start_date(cls, value: object) -> object:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime(value.year, value.month, value.day, tzinfo=UTC)
        return value

    @field_validator("start_date")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

    @field_validator("retry_delay", "max_retry_delay", "deadline", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return None if value is None else parse_duration(value)

    @field_validator("execution_timeout", mode="before")
    @classmethod
    def _timeout(cls, value: object) -> object:
        return None if value is None else positive_duration(value)

    @field_validator("timeouts", mode="before")
    @classmethod
    def _timeouts(cls, value: object) -> object:
        if value is None:
            return StepTimeouts()
        if not isinstance(value, dict | StepTimeouts):
            raise ValueError(f"expected a mapping of step to duration, e.g. {TIMEOUTS_EXAMPLE}")
        return value

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in STORE_SCHEMES:
            raise ValueError(
                "expected lmdb:///path, redis://host:port/db, rediss://host:port/db or "
                "redis+cluster://host:port,host:port/"
            )
        if parts.password:
            raise ValueError(
                "expected a URL without a password (it would show in the trigger form); "
                "set BATCHSCORE_STORE_PASSWORD for the workers instead"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.catchup and "start_date" not in self.model_fields_set:
            raise ValueError(
                "field 'start_date': expected the first logical date to run, since catchup "
                "is true; found none"
            )
        registered = REGISTERED_MODEL_URI.match(self.model_uri)
        if self.namespace is None and registered is None:
            raise ValueError(
                f"field 'namespace': expected a namespace ({NAMESPACE_RULE}), since "
                f"model_uri {self.model_uri!r} names no registered model whose name would be "
                "the default namespace; found none"
            )
        if self.shadow and ALIAS.match(self.shadow) and registered is None:
            raise ValueError(
                f"field 'shadow': expected a model URI ({MODEL_URI_EXPECTED}), since model_uri "
                f"{self.model_uri!r} names no registered model to take the alias of; found "
                f"{self.shadow!r}"
            )
        model_name = registered["name"] if registered else ""
        if self.namespace is None and not is_namespace(model_name):
            raise ValueError(
                f"field 'namespace': expected a namespace ({NAMESPACE_RULE}), since the "
                f"model's name {model_name!r}, the default namespace, is not one; found none"
            )
        if self.shadow and self.canary:
            raise ValueError(
                "field 'canary': expected none, since a shadow job never publishes; found "
                f"a canary at {self.canary.percent:g} %"
            )
        if self.candidate == self.model_uri:
            raise ValueError(
                f"field 'shadow': expected a candidate other than the live model; found "
                f"{self.shadow!r}, which is model_uri itself"
            )
        return self


def _cron(expression: str) -> str:
    """A cron string or preset that Airflow's cron timetable accepts; ``@once`` too."""
    if expression == "@once":
        return expression
    from airflow.sdk import CronTriggerTimetable

    try:
        CronTriggerTimetable(expression, timezone="UTC").validate()
    except Exception as exc:
        raise ValueError(
            f"expected a cron string such as '0 2 * * *' or a preset such as @daily ({exc})"
        ) from None
    return expression


@dataclass(frozen=True)
class LoadedJob:
    path: Path
    config: JobConfig


@dataclass(frozen=True)
class JobConfigs:
    """The folder's valid jobs, and one line per problem of the others."""

    directory: Path
    jobs: list[LoadedJob]
    problems: list[str]

    def raise_for_problems(self) -> None:
        if self.problems:
            raise JobConfigError(
                f"{len(self.problems)} problem(s) in the batchscore job configs in "
                f"{self.directory}; the jobs named here have no DAG until fixed:\n  "
                + "\n  ".join(self.problems),
                fix="Correct the files named above (their other jobs' DAGs are unaffected)",
            )


def jobs_dir(default: Path) -> Path:
    """``BATCHSCORE_DAG_JOBS_DIR`` when set, else ``default`` (``dags/jobs/``)."""
    from batchscore.core.settings import DagSettings, load_settings

    return load_settings(DagSettings).dag_jobs_dir or default


def load_jobs(directory: Path) -> JobConfigs:
    """Every ``*.yaml``/``*.yml`` in ``directory``; a bad file never stops the others."""
    if not directory.is_dir():
        problem = f"{directory}: the job config folder does not exist ({JOBS_DIR_VARIABLE})"
        return JobConfigs(directory, [], [problem])
    jobs, problems = [], []
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    for path in files:
        try:
            jobs.append(LoadedJob(path, load_job(path)))
        except JobConfigError as exc:
            problems.extend(exc.found.splitlines() if exc.found else [str(exc)])
    by_name: dict[str, list[LoadedJob]] = defaultdict(list)
    for job in jobs:
        by_name[job.config.name].append(job)
    for name, same in by_name.items():
        if len(same) > 1:
            files_ = " and ".join(str(j.path) for j in same)
            problems.append(
                f"{files_}: field 'name': expected a name no other job uses; found {name!r} "
                f"in {len(same)} files (DAG {same[0].config.dag_id})"
            )
    duplicated = {name for name, same in by_name.items() if len(same) > 1}
    return JobConfigs(directory, [j for j in jobs if j.config.name not in duplicated], problems)


def load_job(path: Path) -> JobConfig:
    """One file → a ``JobConfig``, or ``JobConfigError`` whose ``found`` lists the problems."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise JobConfigError(
            f"Job config {path} is not valid YAML",
            found=f"{path}: not valid YAML{where}: {problem}",
        ) from None
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise JobConfigError(
            f"Job config {path} is not a mapping",
            found=f"{path}: expected a mapping of job fields (name: ..., model_uri: ...); "
            f"found {found}",
        )
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise JobConfigError(
            f"Job config {path} is invalid",
            found="\n".join(_describe(path, error) for error in exc.errors()),
        ) from None


def _describe(path: Path, error: ErrorDetails) -> str:
    field = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = ".".join(str(part) for part in error["loc"][:-1])
        what, names = NESTED_FIELDS.get(parent, ("job config fields", _names(JobConfig)))
        return (
            f"{path}: field '{field}': expected one of the {what} ({names}); found an unknown field"
        )
    if error["type"] == "missing":
        return f"{path}: field '{field}': expected a value; found none (it is required)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if not field:
        return f"{path}: {message}"
    if not message.startswith("expected"):
        message = f"expected: {message[:1].lower()}{message[1:]}"
    found = error.get("input")
    if field == "store_url" and isinstance(found, str):
        found = _redacted(found)
    return f"{path}: field '{field}': {message}; found {repr(found)[:120]}"


def _names(model: type[BaseModel]) -> str:
    return ", ".join(info.alias or name for name, info in model.model_fields.items())


#: The mappings inside a job config: what their keys are, for an unknown key's message.
NESTED_FIELDS = {
    "timeouts": ("steps", _names(StepTimeouts)),
    "notify": ("notify fields", _names(NotifyConfig)),
    "notify.smtp": ("smtp fields", _names(SmtpChannel)),
}


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
