"""Property-based API testing: schemathesis generates requests from the OpenAPI schema (valid
and invalid ones) and the service never answers with a 5xx."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from test_service_support import session_generator

from app.service.api import create_app
from app.service.store import EmbeddedStore
from app.settings import Settings

schemathesis = pytest.importorskip("schemathesis")
EXAMPLES = int(os.environ.get("SYNTHEHR_FUZZ_EXAMPLES", "12"))  # per operation

APP = create_app(Settings(redis_url=None, chunk_size=50, rate_limit_per_minute=0,
                          max_patients_per_request=100, max_cohort_size=100_000),
                 generator_factory=lambda _s: session_generator(), store=EmbeddedStore())
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    if case.path == "/v1/cohorts" and case.method == "POST" and isinstance(case.body, dict):
        size = case.body.get("size")
        if isinstance(size, int) and size > 300:  # keep the in-process worker's work small
            case.body["size"] = 300
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body,
                                        response.status_code, response.text[:500])
