"""Schemathesis against the API's own OpenAPI spec: no generated request gets a 5xx.

In process (ASGI) over a real embedded store, and over real HTTP (``batchscore
serve``) on a real redis-server, each holding one published version, so lookups
reach the store and the encoder, not only the validation layer. Bounded to a
fixed number of examples per operation to stay well under a minute each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from batchscore.core.settings import ApiSettings
from lookup.app import create_app
from tests.conftest import RedisServer
from tests.integration.test_api_service import KEYS, Start, write_version

PATHS = {
    "/v1/predictions/{namespace}/{key}",
    "/v1/predictions/{namespace}/batch",
    "/v1/namespaces",
    "/v1/namespaces/{namespace}",
}


def no_server_errors(schema: schemathesis.schemas.BaseSchema) -> None:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= PATHS
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        call()


def test_no_generated_request_gets_a_server_error(tmp_path: Path) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS, "1")
    app = create_app(ApiSettings(home=tmp_path / "home", store_url=store_url, access_log=False))
    no_server_errors(schemathesis.openapi.from_asgi("/openapi.json", app))


@pytest.mark.redis
def test_no_generated_request_gets_a_server_error_over_http_on_redis(
    tmp_path: Path, redis_server: RedisServer, api_env: dict[str, str], start_api: Start
) -> None:
    write_version(redis_server.url, tmp_path / "v1", KEYS, "1")
    api = start_api(api_env | {"BATCHSCORE_ACCESS_LOG": "false"}, redis_server.url)
    no_server_errors(schemathesis.openapi.from_url(f"{api.base}/openapi.json"))
    served = [
        float(line.rsplit(" ", 1)[1])
        for line in api.get("/metrics").text.splitlines()
        if line.startswith("batchscore_lookup_responses_total{")
    ]
    assert sum(served) >= 4 * 40  # the generated requests reached this server
    assert api.get(f"/v1/predictions/churn/{KEYS[0]}").json()["source"] == "kv"
