"""Model URIs as MLflow takes them, parsed by MLflow's own parsers.

The forms a run accepts (``EXPECTED``):

- ``models:/<name>@<alias>``   a registered model's alias
- ``models:/<name>/<version>`` one registered version
- ``models:/<name>/latest``    the highest registered version
- ``models:/m-<id>``           an MLflow 3 logged model, registered or not
- ``runs:/<run id>/<path>``    a model folder among a run's artifacts

Stages (``models:/<name>/Production``) are refused: MLflow deprecated them for aliases.
MLflow's parsers are imported when a URI is parsed, not with this module, so that the
DAG files may import it when they are parsed. ``models:/`` goes through
``mlflow.store.artifact.utils.models._parse_model_uri``, the parser MLflow's own
``models:/`` artifact repository uses (private by name, so it is held by
``tests/unit/test_model_uris.py``); ``runs:/`` through the public
``RunsArtifactRepository.parse_runs_uri``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from registry.errors import ModelNotFound

EXPECTED = (
    "models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest, "
    "models:/m-<model id> or runs:/<run id>/<artifact path>"
)
LOGGED_MODEL_PREFIX = "m-"  # MLflow 3 logged model ids

UriKind = Literal["alias", "version", "latest", "logged_model", "run"]


@dataclass(frozen=True)
class ModelUri:
    """A parsed model URI: what it names, before the registry is asked what that is now."""

    uri: str  # as given, without surrounding blanks
    kind: UriKind
    name: str | None = None  # alias, version, latest
    version: str | None = None  # version
    alias: str | None = None  # alias
    model_id: str | None = None  # logged_model
    run_id: str | None = None  # run
    artifact_path: str | None = None  # run

    @property
    def is_registered(self) -> bool:
        """Whether it names a registered model (and so has a name to put an alias on)."""
        return self.kind in ("alias", "version", "latest")


def parse_model_uri(model_uri: str) -> ModelUri:
    """Parse one of the forms of ``EXPECTED``; anything else fails naming the URI."""
    uri = model_uri.strip()
    if uri.startswith("runs:/"):
        return _parse_runs_uri(uri)
    if uri.startswith("models:/"):
        return _parse_models_uri(uri)
    raise ModelNotFound(
        f"Model URI '{uri}' is not a registry URI (models:/) or a run's model (runs:/)",
        expected=EXPECTED,
        found=f"the scheme {uri.split(':', 1)[0]!r}" if ":" in uri else "no scheme",
    )


def _parse_models_uri(uri: str) -> ModelUri:
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import _parse_model_uri

    try:
        parsed = _parse_model_uri(uri)
    except MlflowException:
        raise _bad(uri, "MLflow cannot parse it") from None
    if parsed.model_id is not None:
        if not parsed.model_id.startswith(LOGGED_MODEL_PREFIX):
            raise _bad(uri, f"'{parsed.model_id}' is a name without a version or an alias")
        return ModelUri(uri, "logged_model", model_id=parsed.model_id)
    assert parsed.name is not None
    if parsed.alias is not None:
        return ModelUri(uri, "alias", name=parsed.name, alias=parsed.alias)
    if parsed.version is not None:
        return ModelUri(uri, "version", name=parsed.name, version=parsed.version)
    if parsed.stage is not None:
        raise _bad(
            uri,
            f"'{parsed.stage}' is a stage, which MLflow deprecated",
            fix=f"Use an alias instead: models:/{parsed.name}@<alias>",
        )
    return ModelUri(uri, "latest", name=parsed.name)


def _parse_runs_uri(uri: str) -> ModelUri:
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    try:
        run_id, artifact_path = RunsArtifactRepository.parse_runs_uri(uri)
    except MlflowException:
        raise _bad(uri, "MLflow cannot parse it") from None
    if not artifact_path:
        raise _bad(uri, "it names a run but no model folder in its artifacts")
    return ModelUri(uri, "run", run_id=run_id, artifact_path=artifact_path.strip("/"))


def _bad(uri: str, found: str, fix: str | None = None) -> ModelNotFound:
    return ModelNotFound(
        f"Model URI '{uri}' is not one batchscore can pin",
        expected=EXPECTED,
        found=found,
        fix=fix,
    )
