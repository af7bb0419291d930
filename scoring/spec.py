"""A downloaded MLflow model's spec: its feature columns, outputs, flavor and how it loads.

Read from the model folder's MLmodel file (what ``registry`` downloaded once per run), and
whether this deployment may load it (a pickle runs code from the artifact). Nothing here
imports torch: the resolve step, which pins the model and checks it, needs only this, and
each of the DAG's tasks is a process of its own that pays for what it imports
(``scoring.model`` has the predictor, which needs torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from scoring.errors import UnsupportedModel

#: How a model's files become a model. pickle/cloudpickle run code from the artifact when
#: loaded; code (MLflow's models-from-code) runs the artifact's Python file; pt2 is a
#: torch.export program; native is another flavor's own format, loaded by MLflow.
Serialization = Literal["pt2", "pickle", "cloudpickle", "code", "native"]
PICKLED = frozenset({"pickle", "cloudpickle"})
ALLOW_PICKLE_SETTING = "BATCHSCORE_ALLOW_PICKLE"


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs and gives: feature columns in order, output names, how it loads."""

    features: tuple[str, ...]
    outputs: tuple[str, ...]
    flavor: Literal["pytorch", "pyfunc"]
    serialization: Serialization | None
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
        _serialization(model_dir, meta.flavors.get("pytorch"))
        if flavor == "pytorch"
        else _pyfunc_serialization(meta.flavors)
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


def _pyfunc_serialization(flavors: Mapping[str, object]) -> Serialization:
    pyfunc = flavors.get("python_function")
    if not isinstance(pyfunc, dict):
        pyfunc = {}
    if pyfunc.get("model_code_path"):
        return "code"
    if pyfunc.get("python_model") or pyfunc.get("cloudpickle_version"):
        return "cloudpickle"
    formats = {
        conf.get("serialization_format")
        for conf in flavors.values()
        if isinstance(conf, dict) and conf.get("serialization_format")
    }
    if formats & PICKLED:
        return "cloudpickle" if "cloudpickle" in formats else "pickle"
    return "native"


def _output_names(signature: object) -> tuple[str, ...]:
    outputs = getattr(signature, "outputs", None)
    if outputs is None or outputs.is_tensor_spec():
        return ()
    names = outputs.input_names()
    return tuple(n for n in names if isinstance(n, str))


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    """Whether pickled models may load: ``BATCHSCORE_ALLOW_PICKLE`` when set, else
    MLflow's own switch ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` (MLflow's default: yes)."""
    if allow_pickle is not None:
        return allow_pickle
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION

    return bool(MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get())


def check_loadable(spec: ModelSpec, model_uri: str, allow_pickle: bool | None = None) -> None:
    check_trusted(spec.serialization, model_uri, allow_pickle)


def check_trusted(serialization: str | None, model_uri: str, allow_pickle: bool | None) -> None:
    """Refuse a pickled model, before any worker could unpickle it, unless pickles are
    allowed: unpickling runs whatever code whoever wrote the model version put in it."""
    if serialization in PICKLED and not pickle_allowed(allow_pickle):
        raise UnsupportedModel(
            f"Model {model_uri} is stored as a {serialization}, and loading a pickle runs "
            "code from the artifact on the workers; pickled models are not allowed here",
            expected="a model logged with serialization_format='pt2' (PyTorch) or as "
            "models-from-code, or explicit trust in whoever can write this model's versions",
            fix=f"Set {ALLOW_PICKLE_SETTING}=true if you trust them (unset, batchscore "
            "follows MLflow: MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true allows pickles)",
        )
