"""The MLflow model registry: resolve an alias to one version (the run's pin), download it.

Model URIs are MLflow's: ``models:/name@alias``, ``models:/name/3``. The pin is
taken once, when a run starts; every later step uses ``models:/name/<version>``
and the local copy downloaded into the run folder, never the alias again.

A model registered from a local folder is first copied into the tracking server's
artifact store, as the files of a run of the ``batchscore-model-registry`` experiment;
the version is registered from that run (``runs:/<id>/model``). A tracking server
refuses a local source that belongs to no run, and a version whose source is the user's
folder would break once the folder moved.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from registry.errors import ModelNotFound, RegistryError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

REGISTER_EXPERIMENT = "batchscore-model-registry"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))$")


@dataclass(frozen=True)
class ModelPin:
    name: str
    version: str
    requested: str  # the URI as the user gave it
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: tuple[str, ...]
    created_at: int
    source: str
    run_id: str | None


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    match = MODEL_URI.match(model_uri.strip())
    if not match:
        raise ModelNotFound(
            f"Model URI '{model_uri}' is not a registry URI",
            expected="models:/<name>@<alias> or models:/<name>/<version>",
        )
    return match["name"], match["version"], match["alias"]


class MlflowRegistry:
    def __init__(self, tracking_uri: str, artifact_root: Path | None = None) -> None:
        """``artifact_root``: where a registered folder's files go when the tracking URI is
        a database (a server keeps its own); default ``mlartifacts`` beside a SQLite file."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root or _default_artifact_root(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def resolve(self, model_uri: str) -> ModelPin:
        """Pin a model URI to one concrete registered version."""
        name, version, alias = parse_model_uri(model_uri)
        self._require_model(name)
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
            return ModelPin(name, str(found.version), model_uri, alias)
        try:
            found = self._client.get_model_version(name, str(version))
        except Exception as exc:
            if not _missing(exc):
                raise
            raise ModelNotFound(
                f"Registered model '{name}' has no version {version}",
                expected=f"one of versions {[v.version for v in self.versions(name)]}",
            ) from None
        return ModelPin(name, str(found.version), model_uri)

    def download(self, pin: ModelPin, destination: Path) -> Path:
        """Download the pinned version once; a folder that exists is complete."""
        if (destination / "MLmodel").exists():
            return destination
        import mlflow.artifacts

        staging = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}")
        staging.mkdir(parents=True)
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=pin.uri, dst_path=str(staging), tracking_uri=self.tracking_uri
            )
            # MLflow returns an empty folder, without an error, when the version's
            # artifacts are gone from the store: that is not a model.
            if not (staging / "MLmodel").exists():
                raise ModelNotFound(
                    f"The artifacts of {pin.uri} are missing from the artifact store",
                    expected="the registered version's model folder, with its MLmodel file",
                    found="an empty download, with no MLmodel file",
                    fix="register the model again or pin another version",
                )
            os.replace(staging, destination)
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
        return sorted(m.name for m in self._client.search_registered_models())

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


def _default_artifact_root(tracking_uri: str) -> Path | None:
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
