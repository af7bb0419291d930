"""What the API's bodies look like: the pydantic models of the OpenAPI document (and of the
batch request, which is parsed with them), and the ``TypedDict``s the handlers build.

Answers are not validated through the pydantic models on the way out: the handlers build
plain dicts (typed here, so the two shapes are checked side by side) and encode them once
with orjson; ``tests/integration/test_api_schema.py`` checks the document matches.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypedDict

from pydantic import BaseModel, Field, StringConstraints

Source = Literal["kv", "batch"]


class ModelRef(BaseModel):
    name: str
    version: str


class PredictionOut(BaseModel):
    key: str
    prediction: dict[str, float]
    model: ModelRef
    run_id: str
    mlflow_run_id: str | None = Field(
        None, description="The MLflow run that recorded the scoring run, when one did."
    )
    scored_at: str
    source: Source
    stale: bool = False
    version: int = Field(description="The version of the namespace the answer comes from.")
    canary: bool = Field(
        False,
        description="The key is in a canary's share: answered by the canary version "
        "(or, stale, by the live version before it). False outside a canary.",
    )


MAX_KEY_LENGTH = 4096  # the largest BATCHSCORE_MAX_KEY_LENGTH
MAX_BATCH_KEYS = 100_000  # the largest BATCHSCORE_MAX_BATCH_KEYS
BatchKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY_LENGTH)]


class BatchRequest(BaseModel):
    """The bounds here hold whatever the settings say; the settings' own (smaller) bounds
    are checked after parsing, and the body's size before it is read."""

    keys: list[BatchKey] = Field(
        min_length=1, max_length=MAX_BATCH_KEYS, description="Keys to look up."
    )


class BatchItem(BaseModel):
    key: str
    status: Literal["found", "not_found"]
    prediction: dict[str, float] | None = None
    model: ModelRef
    run_id: str
    mlflow_run_id: str | None = Field(
        None, description="The MLflow run that recorded the scoring run, when one did."
    )
    scored_at: str
    source: Source
    stale: bool = False
    version: int = Field(description="The version the key was looked up in.")
    canary: bool = Field(False, description="The key is in a canary's share.")


class BatchResponse(BaseModel):
    results: list[BatchItem]


class NamespaceOut(BaseModel):
    namespace: str
    live_version: int
    model: ModelRef
    run_id: str
    mlflow_run_id: str | None = Field(
        None, description="The MLflow run that recorded the scoring run, when one did."
    )
    scored_at: str
    published_at: str | None
    age_seconds: float | None = Field(description="Seconds since the live version was published.")
    key_count: int
    kept_versions: list[int]
    canary: CanaryOut | None = Field(
        None, description="A version answering a share of the keys beside the live one."
    )


class CanaryOut(BaseModel):
    version: int
    percent: float = Field(description="Share of the keys (by a stable hash) it answers.")
    started_at: str


class NamespaceList(BaseModel):
    namespaces: list[NamespaceOut]
    source: Literal["store", "cache"]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


# The bodies as built: each TypedDict mirrors the model above of the same role.


class ModelBody(TypedDict):
    name: str
    version: str


class AnswerBody(TypedDict):  # PredictionOut
    key: str
    prediction: dict[str, float]
    model: ModelBody
    run_id: str
    mlflow_run_id: str | None
    scored_at: str
    source: Source
    stale: bool
    version: int
    canary: bool


class ItemBody(AnswerBody, total=False):  # BatchItem: an answer and its status
    status: Literal["found", "not_found"]


class MissingBody(TypedDict):  # BatchItem for a key not found, less its key
    status: Literal["not_found"]
    prediction: None
    model: ModelBody
    run_id: str
    mlflow_run_id: str | None
    scored_at: str
    source: Source
    stale: bool
    version: int
    canary: bool


class NamespaceBody(TypedDict):  # NamespaceOut
    namespace: str
    live_version: int
    model: ModelBody
    run_id: str
    mlflow_run_id: str | None
    scored_at: str
    published_at: str | None
    age_seconds: float | None
    key_count: int
    kept_versions: list[int]
    canary: CanaryBody | None


class CanaryBody(TypedDict):  # CanaryOut
    version: int
    percent: float
    started_at: str


# The OpenAPI document's extras: the batch body (read by hand, so not in the signature),
# the two ways to present a key, and the error answers every secured route may give.

OpenApiExtra = dict[str, object]

BATCH_BODY: OpenApiExtra = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": BatchRequest.model_json_schema()}},
    }
}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
SECURED: OpenApiExtra = {"security": [{"bearer": []}, {"apiKey": []}]}
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 422, 429, 503)
}
