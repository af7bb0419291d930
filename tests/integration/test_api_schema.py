"""Schemathesis against the API's own OpenAPI spec: no generated request gets a 5xx.

In process (ASGI) over a real embedded store holding one published version, so
lookups reach the store and the encoder, not only the validation layer. Bounded
to a fixed number of examples per operation to stay well under a minute.
"""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from batchscore.settings import ApiSettings
from lookup.app import create_app
from tests.integration.test_api_service import KEYS, write_version


def test_no_generated_request_gets_a_server_error(tmp_path: Path) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS, "1")
    app = create_app(ApiSettings(home=tmp_path / "home", store_url=store_url, access_log=False))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/predictions/{namespace}/{key}",
        "/v1/predictions/{namespace}/batch",
        "/v1/namespaces",
        "/v1/namespaces/{namespace}",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        call()
