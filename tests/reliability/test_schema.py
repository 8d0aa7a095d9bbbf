"""Schemathesis over the running service's own OpenAPI document: no 5xx, and every answer is what the document says.

    pytest tests/reliability/test_schema.py            # about a minute: a bounded number of cases per operation

Cases are generated from the schema (valid and invalid bodies, query parameters, multipart uploads) and sent over
real HTTP to ``python -m service`` serving the committed models. Each answer must not be a server error, must use a
documented status code and content type, and must match the documented response schema: /v1 and /v2 alike, since
every /v2 route documents its own statuses and bodies (metadata, configuration, the inference response, the
protocol's error body), and the path examples (mnist-cnn and the shipped version) reach their 200s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from reliability_helpers import ROOT, LiveServer, running_server
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.main import create_app
from service.settings import Settings

#: Cases per API operation: enough to reach every documented error path, bounded so the module takes ~1 minute.
EXAMPLES = 150
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_server(tmp_path_factory.mktemp("schemathesis")) as live:
        yield live


# The document the server will serve, built by the same code without starting anything (no model is loaded):
# schemathesis' lazy from_fixture loader does not work with pytest 9.
schema = schemathesis.openapi.from_dict(create_app(Settings(model_dir=ROOT / "models")).openapi())


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_answers_as_documented(case: schemathesis.Case, server: LiveServer) -> None:
    case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=30)


def test_the_server_logged_no_traceback(server: LiveServer) -> None:
    """Runs after the generated cases (same module, same server): nothing they sent was an unhandled error."""
    assert "Traceback" not in Path(server.log_path).read_text(errors="replace")
