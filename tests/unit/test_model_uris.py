"""Model URIs as MLflow takes them: every accepted form, and bad forms refused by name."""

from __future__ import annotations

import pytest

from jobs.errors import RunError
from jobs.shadow import candidate_uri
from registry.errors import ModelNotFound
from registry.mlflow_registry import ModelPin
from registry.uris import EXPECTED, ModelUri, parse_model_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "models:/churn@champion",
            ModelUri("models:/churn@champion", "alias", "churn", alias="champion"),
        ),
        ("models:/churn/3", ModelUri("models:/churn/3", "version", "churn", version="3")),
        ("models:/churn/latest", ModelUri("models:/churn/latest", "latest", "churn")),
        ("models:/churn/LATEST", ModelUri("models:/churn/LATEST", "latest", "churn")),
        (
            "models:/m-0123456789abcdef",
            ModelUri("models:/m-0123456789abcdef", "logged_model", model_id="m-0123456789abcdef"),
        ),
        (
            "runs:/4f1c0ffee/model",
            ModelUri("runs:/4f1c0ffee/model", "run", run_id="4f1c0ffee", artifact_path="model"),
        ),
        (
            "runs:/4f1c0ffee/models/churn",
            ModelUri(
                "runs:/4f1c0ffee/models/churn",
                "run",
                run_id="4f1c0ffee",
                artifact_path="models/churn",
            ),
        ),
        ("  models:/churn/2 ", ModelUri("models:/churn/2", "version", "churn", version="2")),
    ],
)
def test_each_form_parses_to_what_it_names(uri: str, expected: ModelUri) -> None:
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "found"),
    [
        ("churn", "Found no scheme"),
        ("s3://bucket/model", "Found the scheme 's3'"),
        ("models:/churn", "'churn' is a name without a version or an alias"),
        ("models:/churn/Production", "'Production' is a stage, which MLflow deprecated"),
        ("models:/", "MLflow cannot parse it"),
        ("models:/churn/1/extra", "MLflow cannot parse it"),
        ("models:/churn@", "MLflow cannot parse it"),
        ("runs:/", "MLflow cannot parse it"),
        ("runs:/4f1c0ffee", "it names a run but no model folder"),
    ],
)
def test_a_bad_form_is_refused_naming_the_uri_and_the_forms(uri: str, found: str) -> None:
    with pytest.raises(ModelNotFound) as caught:
        parse_model_uri(uri)
    message = str(caught.value)
    assert f"Model URI '{uri.strip()}' is not" in message
    assert found in message
    assert EXPECTED in message


def test_a_stage_is_refused_with_the_alias_to_use_instead() -> None:
    with pytest.raises(ModelNotFound, match=r"Use an alias instead: models:/churn@<alias>"):
        parse_model_uri("models:/churn/Staging")


@pytest.mark.parametrize(
    ("pin", "uri"),
    [
        (ModelPin("churn", "3", "models:/churn@champion", "champion"), "models:/churn/3"),
        (ModelPin("churn", "3", "models:/churn/latest"), "models:/churn/3"),
        (
            ModelPin("model", "m-abc", "models:/m-abc", source="logged_model", model_id="m-abc"),
            "models:/m-abc",
        ),
        (
            ModelPin("model", "r1", "runs:/r1/model", source="run", artifact_path="model"),
            "runs:/r1/model",
        ),
    ],
)
def test_the_pin_is_always_concrete(pin: ModelPin, uri: str) -> None:
    assert pin.uri == uri
    assert "@" not in pin.uri and "latest" not in pin.uri


def test_a_shadow_alias_names_an_alias_of_the_live_registered_model() -> None:
    assert candidate_uri("models:/churn@champion", "challenger") == "models:/churn@challenger"
    assert candidate_uri("models:/churn/latest", "challenger") == "models:/churn@challenger"
    assert candidate_uri("models:/churn/2", "runs:/r1/model") == "runs:/r1/model"
    assert candidate_uri("models:/churn/2", None) is None


def test_a_shadow_alias_of_a_model_outside_the_registry_is_refused() -> None:
    with pytest.raises(RunError, match=r"'challenger' is an alias, but the model models:/m-abc"):
        candidate_uri("models:/m-abc", "challenger")
