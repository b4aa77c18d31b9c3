"""The HTTP API fuzzed from its own OpenAPI spec with schemathesis: no 500s, no hangs, whatever comes in."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from tests.runtime.server_helpers import start


@pytest.mark.slow
def test_no_input_makes_the_server_fail_or_hang(tmp_path):
    server = start(tmp_path, max_queue=8)
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
        calls = {"n": 0}
        for operation in operations:
            @given(case=operation.as_strategy())
            @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case):
                for key in (server.keys["acme"], "not-a-key"):  # through authentication, and stopped at it
                    response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=60)
                    case.validate_response(response, checks=[not_a_server_error])
                    calls["n"] += 1

            fuzz()
        assert server.process.poll() is None  # still up
        print(f"\n[reliability] schemathesis: {len(operations)} operations, {calls['n']} generated requests, no 5xx, "
              f"none timed out")
    finally:
        server.stop()
