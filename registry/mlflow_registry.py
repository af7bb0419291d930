"""The MLflow model registry: resolve an alias to one version (the run's pin), download it.

Model URIs are MLflow's (``registry.uris``): ``models:/name@alias``, ``models:/name/3``,
``models:/name/latest``, ``models:/m-<id>`` (an MLflow 3 logged model) and
``runs:/<run id>/<path>``. The pin is taken once, when a run starts, and is always
concrete (``ModelPin.uri``): ``models:/name/<version>`` for a registered model,
``models:/m-<id>`` for a logged model, ``runs:/<run id>/<path>`` for a run's folder.
Every later step uses the pin and the local copy downloaded into the run folder, never
the alias or ``latest`` again.

The registry may live apart from the tracking store (``MLFLOW_REGISTRY_URI``): names,
versions and aliases are read there, runs and logged models in the tracking store.

A model registered from a local folder is first copied into the tracking server's
artifact store, as the files of a run of the ``batchscore-model-registry`` experiment;
the version is registered from that run (``runs:/<id>/model``). A tracking server
refuses a local source that belongs to no run, and a version whose source is the user's
folder would break once the folder moved.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from registry.errors import ModelNotFound, RegistryError
from registry.uris import ModelUri, parse_model_uri

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from batchscore.core.settings import RunSettings

__all__ = [
    "REGISTER_EXPERIMENT",
    "MlflowRegistry",
    "ModelPin",
    "ModelUri",
    "RegisteredVersion",
    "default_artifact_root",
    "parse_model_uri",
]

REGISTER_EXPERIMENT = "batchscore-model-registry"
PinSource = Literal["registry", "logged_model", "run"]


@dataclass(frozen=True)
class ModelPin:
    """One concrete model, whatever the URI that named it.

    ``version`` is what identifies it for good, and what the run's manifest, the store's
    version record and the lookup API's answers carry: the registered version for
    ``source`` "registry", the logged model's id (``m-...``) for "logged_model", the run's
    id for "run" (with ``artifact_path`` the folder among its artifacts). ``name`` is the
    registered model's name, the logged model's name, or the folder's last component.
    """

    name: str
    version: str
    requested: str  # the URI as the user gave it
    alias: str | None = None
    source: PinSource = "registry"
    artifact_path: str | None = None  # "run" only
    model_id: str | None = None  # the MLflow 3 logged model behind it, when there is one
    run_id: str | None = None  # the MLflow run that produced it, when known

    @property
    def uri(self) -> str:
        """The concrete URI every step after resolve uses."""
        if self.source == "logged_model":
            return f"models:/{self.version}"
        if self.source == "run":
            return f"runs:/{self.version}/{self.artifact_path}"
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: tuple[str, ...]
    created_at: int
    source: str
    run_id: str | None


class MlflowRegistry:
    def __init__(
        self,
        tracking_uri: str,
        artifact_root: Path | None = None,
        *,
        registry_uri: str | None = None,
    ) -> None:
        """``artifact_root``: where a registered folder's files go when the tracking URI is
        a database (a server keeps its own); default ``mlartifacts`` beside a SQLite file.
        ``registry_uri``: the model registry, when it is not the tracking store."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.artifact_root = artifact_root or default_artifact_root(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(self.registry_uri)
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=self.registry_uri)

    @classmethod
    def from_settings(cls, settings: RunSettings) -> MlflowRegistry:
        """The registry of a run's settings: ``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI``."""
        return cls(settings.tracking_uri, registry_uri=settings.mlflow_registry_uri)

    def resolve(self, model_uri: str) -> ModelPin:
        """Pin a model URI to one concrete model (``ModelPin``)."""
        parsed = parse_model_uri(model_uri)
        if parsed.kind == "logged_model":
            return self._pin_logged_model(parsed)
        if parsed.kind == "run":
            return self._pin_run(parsed)
        assert parsed.name is not None
        name, version, alias = parsed.name, parsed.version, parsed.alias
        self._require_model(name)
        if parsed.kind == "latest":
            known = self.versions(name)
            if not known:
                raise ModelNotFound(
                    f"Registered model '{name}' has no versions, so {model_uri} names none",
                    fix=f"batchscore model register MODEL_FOLDER {name}",
                )
            return self._registry_pin(
                self._client.get_model_version(name, known[-1].version), model_uri
            )
        if alias is not None:
            try:
                found = self._client.get_model_version_by_alias(name, alias)
            except Exception as exc:
                if not _missing(exc):
                    raise
                raise ModelNotFound(
                    f"Registered model '{name}' has no alias '{alias}'",
                    expected=f"one of its aliases {self._aliases(name) or '(none set)'}",
                    fix=f"batchscore model promote {name} VERSION --alias {alias}",
                ) from None
            return self._registry_pin(found, model_uri, alias)
        try:
            found = self._client.get_model_version(name, str(version))
        except Exception as exc:
            if not _missing(exc):
                raise
            raise ModelNotFound(
                f"Registered model '{name}' has no version {version}",
                expected=f"one of versions {[v.version for v in self.versions(name)]}",
            ) from None
        return self._registry_pin(found, model_uri)

    @staticmethod
    def _registry_pin(found: ModelVersion, requested: str, alias: str | None = None) -> ModelPin:
        return ModelPin(
            str(found.name),
            str(found.version),
            requested,
            alias,
            model_id=_logged_model_id(found),
            run_id=found.run_id or None,
        )

    def _pin_logged_model(self, parsed: ModelUri) -> ModelPin:
        """A logged model (MLflow 3), registered or not: its id is the pin."""
        assert parsed.model_id is not None
        try:
            found = self._client.get_logged_model(parsed.model_id)
        except Exception as exc:
            if not _missing(exc):
                raise
            raise ModelNotFound(
                f"Logged model '{parsed.model_id}' does not exist in {self.tracking_uri}",
                expected="the id of a model logged with mlflow.<flavor>.log_model (m-...)",
                fix="Check MLFLOW_TRACKING_URI, or copy the id from the MLflow UI's Models tab",
            ) from None
        return ModelPin(
            found.name,
            found.model_id,
            parsed.uri,
            source="logged_model",
            model_id=found.model_id,
            run_id=found.source_run_id,
        )

    def _pin_run(self, parsed: ModelUri) -> ModelPin:
        """A folder among a run's artifacts: the run's id is the pin."""
        assert parsed.run_id is not None and parsed.artifact_path is not None
        try:
            self._client.get_run(parsed.run_id)
        except Exception as exc:
            if not _missing(exc):
                raise
            raise ModelNotFound(
                f"Run '{parsed.run_id}' of {parsed.uri} does not exist in {self.tracking_uri}",
                expected="the id of a run that logged the model",
                fix="Check MLFLOW_TRACKING_URI and the run id",
            ) from None
        return ModelPin(
            Path(parsed.artifact_path).name,
            parsed.run_id,
            parsed.uri,
            source="run",
            artifact_path=parsed.artifact_path,
            run_id=parsed.run_id,
        )

    def download(self, pin: ModelPin, destination: Path) -> Path:
        """Download the pinned version once; a folder that exists is complete."""
        if (destination / "MLmodel").exists():
            return destination
        import mlflow.artifacts

        staging = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}")
        staging.mkdir(parents=True)
        try:
            # A models:/ URI downloads into the folder, a runs:/ URI into a subfolder
            # named as its artifact path: the returned path is the model's folder.
            found = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=pin.uri,
                    dst_path=str(staging),
                    tracking_uri=self.tracking_uri,
                    registry_uri=self.registry_uri,
                )
            )
            # MLflow returns an empty folder, without an error, when the version's
            # artifacts are gone from the store: that is not a model.
            if not (found / "MLmodel").exists():
                raise ModelNotFound(
                    f"The artifacts of {pin.uri} are missing from the artifact store",
                    expected="the registered version's model folder, with its MLmodel file",
                    found="an empty download, with no MLmodel file",
                    fix="register the model again or pin another version",
                )
            os.replace(found, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return destination

    def register(self, source: str, name: str, alias: str | None = None) -> RegisteredVersion:
        """Register a model (a local MLflow model folder or any MLflow model URI)."""
        import mlflow

        path = Path(source).expanduser()
        if path.exists():
            if not (path / "MLmodel").exists():
                raise RegistryError(
                    f"{path} is not an MLflow model folder",
                    expected="a folder with an MLmodel file (from mlflow.<flavor>.save_model)",
                )
            source = self._upload(path, name)
        created = mlflow.register_model(source, name)
        if alias:
            self.promote(name, str(created.version), alias)
        return self._describe(self._client.get_model_version(name, str(created.version)))

    def _upload(self, folder: Path, name: str) -> str:
        """Copy a model folder into the artifact store as a run's ``model``; its runs:/ URI."""
        run = self._client.create_run(
            self._register_experiment(),
            run_name=f"register-{name}",
            tags={"batchscore.registered_from": str(folder.absolute())},
        )
        try:
            self._client.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
        except BaseException:
            self._client.set_terminated(run.info.run_id, status="FAILED")
            raise
        self._client.set_terminated(run.info.run_id)
        return f"runs:/{run.info.run_id}/model"

    def _register_experiment(self) -> str:
        found = self._client.get_experiment_by_name(REGISTER_EXPERIMENT)
        if found is not None:
            return str(found.experiment_id)
        location = None
        if self.artifact_root is not None:
            self.artifact_root.mkdir(parents=True, exist_ok=True)
            location = self.artifact_root.absolute().as_uri()
        try:
            return str(self._client.create_experiment(REGISTER_EXPERIMENT, location))
        except Exception as exc:  # created meanwhile by another process
            found = self._client.get_experiment_by_name(REGISTER_EXPERIMENT)
            if found is None:
                raise exc from None
            return str(found.experiment_id)

    def promote(self, name: str, version: str, alias: str) -> RegisteredVersion:
        """Point ``alias`` at ``version``; runs already started keep their pin."""
        self._require_model(name)
        try:
            found = self._client.get_model_version(name, str(version))
        except Exception as exc:
            if not _missing(exc):
                raise
            raise ModelNotFound(
                f"Registered model '{name}' has no version {version}",
                expected=f"one of versions {[v.version for v in self.versions(name)]}",
            ) from None
        self._client.set_registered_model_alias(name, alias, str(found.version))
        return self._describe(self._client.get_model_version(name, str(found.version)))

    def versions(self, name: str) -> list[RegisteredVersion]:
        """Every version with its aliases (read from the model: version searches omit them)."""
        aliases: dict[str, list[str]] = {}
        for alias, version in (self._client.get_registered_model(name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        found = self._client.search_model_versions(f"name='{name}'")
        described = [
            replace(self._describe(v), aliases=tuple(sorted(aliases.get(str(v.version), []))))
            for v in found
        ]
        return sorted(described, key=lambda v: int(v.version))

    def models(self) -> list[str]:
        """Every registered model's name: MLflow answers a page at a time (100 names by
        default), so the pages are followed until the server gives no next token."""
        names: list[str] = []
        token: str | None = None
        while True:
            page = self._client.search_registered_models(page_token=token)
            names.extend(m.name for m in page)
            token = page.token
            if not token:
                return sorted(names)

    def _require_model(self, name: str) -> None:
        try:
            self._client.get_registered_model(name)
        except Exception as exc:
            if not _missing(exc):
                raise
            known = self.models()
            raise ModelNotFound(
                f"Registered model '{name}' does not exist in {self.tracking_uri}",
                expected=f"one of {known}" if known else "a registered model",
                fix="Check MLFLOW_TRACKING_URI, or register it: batchscore model register",
            ) from None

    def _aliases(self, name: str) -> list[str]:
        return sorted(self._client.get_registered_model(name).aliases or {})

    @staticmethod
    def _describe(version: ModelVersion) -> RegisteredVersion:
        return RegisteredVersion(
            name=version.name,
            version=str(version.version),
            aliases=tuple(sorted(version.aliases or [])),
            created_at=int(version.creation_timestamp or 0),
            source=str(version.source),
            run_id=version.run_id,
        )


def _logged_model_id(version: ModelVersion) -> str | None:
    """The logged model behind a version: its own field, or (a store that leaves the field
    empty, as SQLite's does) its source, ``models:/m-<id>``."""
    if getattr(version, "model_id", None):
        return str(version.model_id)
    source = str(version.source or "")
    if source.startswith("models:/"):
        try:
            return parse_model_uri(source).model_id
        except ModelNotFound:
            return None
    return None


def default_artifact_root(tracking_uri: str) -> Path | None:
    """Beside a SQLite database; none for a server, which has its own artifact store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    return database.parent / "mlartifacts"


def _missing(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return (
        code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
        or "not found" in str(exc).lower()
    )
