"""schemathesis against a live server on loopback: generated requests for every operation of the OpenAPI
schema, a bounded number each; the answers must never be a 5xx and must match the schema (status
codes, content types, bodies). The larger run is heavy: python3 -m pytest -q -m heavy tests/test_server_schema.py."""
from __future__ import annotations

import os

import pytest

from tests.conftest import needs_shared
from tests.live_server import AUTH, live_server, png_bytes, wait_ready

pytestmark = needs_shared
pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# The bar: zero 5xx and zero schema violations (status codes, content types, headers, bodies).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]

EXAMPLES = int(os.environ.get("SEGANY_SCHEMA_EXAMPLES", "4"))


@pytest.fixture(scope="module")
def api_schema(fixture_sam, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    # Small limits keep generated proposals requests short (a job past its limit is a documented 422).
    with live_server(fixture_sam, data, job_time_limit_s=0.5, max_upload_bytes=300_000) as srv:
        c = srv["client"]
        project = c.post("/api/projects", json={"name": "schema"}).json()
        up = c.post(f"/api/projects/{project['id']}/images", files=[("files", ("a.png", png_bytes(40, 50), "image/png"))])
        wait_ready(c, up.json()["images"][0]["id"])
        yield schemathesis.openapi.from_url(srv["base"] + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_matches_its_schema(case):
    case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60)


@pytest.mark.heavy
@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_matches_its_schema_longer(case):
    case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60)
