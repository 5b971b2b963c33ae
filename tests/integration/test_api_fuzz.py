"""Fuzz every operation of the OpenAPI document: no 5xx, no schema breaks."""

from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from tests.support.server import Server

# A fixed seed and bound keep the run repeatable and short.
FUZZ_SEED = 20261204
FUZZ_EXAMPLES = 25


def test_api_never_fails(tmp_path: Path) -> None:
    server = Server(tmp_path / "fuzz")
    server.start()
    try:
        # No worker runs the fuzzed jobs, and the caller is a submitter, so
        # admin operations (adding workers that point at arbitrary hosts)
        # never reach the network from a test.
        server.cli("worker", "disable", "local")
        key = server.cli("user", "add", "fuzzer").stdout.strip().splitlines()[-1]
        document = httpx.get(
            f"{server.url}/openapi.json",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ).json()
        schema = schemathesis.openapi.from_dict(document)
        failures = []
        operations = 0
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1
            try:
                _fuzz_operation(operation, server.url, key)
            except Exception as exc:  # noqa: BLE001  (collect all failures)
                failures.append(f"{operation.label}: {str(exc)[:2000]}")
        assert operations >= 10
        assert failures == [], "\n\n".join(failures)
    finally:
        server.stop()


def _fuzz_operation(operation: object, base_url: str, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}

    @seed(FUZZ_SEED)
    @settings(
        max_examples=FUZZ_EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())  # type: ignore[attr-defined]
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=base_url,
            headers=headers,
            checks=[not_a_server_error, response_schema_conformance],
        )

    run()


pytestmark = pytest.mark.timeout(600)
