"""A downloaded MLflow model as the scoring engine sees it: its spec and a predictor.

Everything here reads a local model folder (what ``registry`` downloaded once
per run); nothing talks to a tracking server, so Dask workers can load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from registry.errors import UnsupportedModel
from scoring.core import as_matrix, score_batch, score_in_batches

NUMERIC_MLFLOW_TYPES = {"float", "double", "integer", "long", "boolean"}


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs and gives: feature columns in order, output names, how it loads."""

    features: tuple[str, ...]
    outputs: tuple[str, ...]
    flavor: Literal["pytorch", "pyfunc"]
    serialization: Literal["pt2", "pickle"] | None
    signature_kind: Literal["columns", "tensor", "none"]
    feature_types: dict[str, str] = field(default_factory=dict)

    def output_names(self, width: int) -> tuple[str, ...]:
        if len(self.outputs) == width:
            return self.outputs
        if width == 1:
            return ("prediction",)
        return tuple(f"prediction_{i}" for i in range(width))


def read_model_spec(model_dir: Path, features: tuple[str, ...] | None = None) -> ModelSpec:
    """Read MLmodel: flavor, serialization and the signature's feature columns.

    ``features`` (``--features``) names the input columns for a model whose
    signature is a tensor or missing; for a column signature it must match it.
    """
    from mlflow.models import Model

    meta = Model.load(str(model_dir / "MLmodel"))
    flavor: Literal["pytorch", "pyfunc"] = "pytorch" if "pytorch" in meta.flavors else "pyfunc"
    if flavor == "pyfunc" and "python_function" not in meta.flavors:
        raise UnsupportedModel(
            f"Model at {model_dir} has neither a pytorch nor a python_function flavor",
            found=f"flavors {sorted(meta.flavors)}",
        )
    serialization = (
        _serialization(model_dir, meta.flavors.get("pytorch")) if flavor == "pytorch" else None
    )
    signature = meta.signature
    if signature is None or signature.inputs.is_tensor_spec():
        kind: Literal["columns", "tensor", "none"] = "none" if signature is None else "tensor"
        if not features:
            raise UnsupportedModel(
                f"Model at {model_dir} has a {kind} input signature, so its feature columns "
                "are not named",
                expected="--features a,b,c (the input columns, in the model's order)",
            )
        spec_features, types = tuple(features), {}
    else:
        kind = "columns"
        spec_features = tuple(signature.inputs.input_names())
        types = {c.name: str(c.type) for c in signature.inputs.inputs}
        if features and tuple(features) != spec_features:
            raise UnsupportedModel(
                "--features does not match the model's column signature",
                expected=f"{list(spec_features)} (or leave --features out)",
                found=str(list(features)),
            )
    return ModelSpec(
        features=spec_features,
        outputs=_output_names(signature),
        flavor=flavor,
        serialization=serialization,
        signature_kind=kind,
        feature_types=types,
    )


def _serialization(model_dir: Path, conf: dict | None) -> Literal["pt2", "pickle"]:
    data = model_dir / (conf or {}).get("model_data", "data")
    return "pt2" if (data / "model.pt2").exists() else "pickle"


def _output_names(signature: object) -> tuple[str, ...]:
    outputs = getattr(signature, "outputs", None)
    if outputs is None or outputs.is_tensor_spec():
        return ()
    names = outputs.input_names()
    return tuple(n for n in names if isinstance(n, str))


def pickle_allowed() -> bool:
    """MLflow's own switch for unpickling models; batchscore honours it as MLflow does."""
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION

    return bool(MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get())


def check_loadable(spec: ModelSpec, model_uri: str) -> None:
    if spec.serialization == "pickle" and not pickle_allowed():
        raise UnsupportedModel(
            f"Model {model_uri} is a pickled PyTorch model, and loading a pickle runs code "
            "from the artifact",
            expected="a model logged with serialization_format='pt2', or explicit trust",
            fix="Set MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true if you trust this model",
        )


class Predictor:
    """A loaded model: Arrow table of features in, (rows, outputs) float32 out."""

    def __init__(self, model_dir: Path, spec: ModelSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        if spec.flavor == "pytorch":
            import mlflow.pytorch

            self._torch = mlflow.pytorch.load_model(str(model_dir))
        else:
            import mlflow.pyfunc

            self._pyfunc = mlflow.pyfunc.load_model(str(model_dir))

    def predict(self, table: pa.Table, batch_size: int) -> np.ndarray:
        if self.spec.flavor == "pytorch":
            features = feature_matrix(table, self.spec.features)
            return score_in_batches(lambda x: score_batch(self._torch, x), features, batch_size)
        frame = table.select(list(self.spec.features)).to_pandas()
        return score_in_batches(
            lambda rows: as_matrix(self._pyfunc.predict(frame.iloc[rows[:, 0]])),
            np.arange(len(frame)).reshape(-1, 1),
            batch_size,
        )


def feature_matrix(table: pa.Table, features: tuple[str, ...]) -> np.ndarray:
    """Arrow columns -> one C-contiguous, writable float32 matrix (one deliberate copy)."""
    matrix = np.empty((table.num_rows, len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        column = table.column(name)
        matrix[:, j] = column.to_numpy() if column.null_count == 0 else _with_nan(column)
    return matrix


def _with_nan(column: pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.cast(column, pa.float32()).to_numpy(zero_copy_only=False)

