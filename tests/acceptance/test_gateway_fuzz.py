"""schemathesis against the gateway's own ``/openapi.json``: generated requests to a real
gateway subprocess on the real Postgres. No input gets a 500, every answer is one the
document describes, every refusal names its rule, and no request without credentials gets in.

``OUTBOX_TEST_FUZZ_EXAMPLES`` sets the examples per operation (default 20: a few hundred in
all over the twelve API operations and the three GETs)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode, checks
from schemathesis.specs.openapi import checks as openapi_checks

from outbox.passwords import set_user
from outbox.web.gateway import openapi_document
from tests.support.gateway import RunningGateway, basic, env_for, gateway

pytestmark = [pytest.mark.acceptance, pytest.mark.integration, pytest.mark.slow]

EXAMPLES = int(os.environ.get("OUTBOX_TEST_FUZZ_EXAMPLES", "20"))
AUTH = basic("fuzz", "fuzz-secret")

schema = schemathesis.openapi.from_dict(openapi_document())
# Bodies that break the document too (a number for the command, data a list, missing keys):
# the gateway must answer them like the device, not fail.
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def running(database_url: str, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[RunningGateway]:
    directory = tmp_path_factory.mktemp("fuzz")
    users = directory / "users"
    set_user(users, "fuzz", "fuzz-secret")
    env = env_for(database_url, OUTBOX_GATEWAY_USERS=str(users),
                  OUTBOX_OTP_SECRET="5e2a8d1f4b7c0e3a6d9f2b5c8e1a4d7f0b3c6e9a2d5f8b1c4e7a0d3f6b9c2e5a",
                  OUTBOX_LOG_LEVEL="warning")
    with gateway(env, Path(directory)) as started:
        yield started


def test_the_served_document_is_the_one_fuzzed(running: RunningGateway) -> None:
    served = httpx.get(f"{running.url}/openapi.json", timeout=30).json()
    assert served == json.loads(json.dumps(openapi_document()))


@schemathesis.check
def refusals_name_their_rule(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx with a body says which rule (and the 401/405/404 have no body)."""
    if response.status_code in (401, 404, 405):
        assert response.content == b"", f"{response.status_code} with a body"
    elif response.status_code >= 400:
        body = json.loads(response.content)
        assert isinstance(body.get("rule"), str) and body["rule"], f"no rule in {body!r}"
        assert body["rule"] != "gateway_internal", "an internal error"
    return None


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_input_breaks_the_gateway(case: Any, running: RunningGateway) -> None:
    case.call_and_validate(
        base_url=running.url, headers={"Authorization": AUTH},
        checks=[checks.not_a_server_error, openapi_checks.status_code_conformance,
                openapi_checks.content_type_conformance,
                openapi_checks.response_schema_conformance, refusals_name_their_rule],
        timeout=30,
    )
    if case.path.startswith("/api/"):
        anonymous = case.call(base_url=running.url, headers={"Authorization": ""}, timeout=30)
        assert (anonymous.status_code, anonymous.content) == (401, b"")
