"""Both HTTP APIs fuzzed from their own OpenAPI documents with schemathesis
(against the running services): no 5xx, every status and body as documented,
invalid input refused. Counts per operation are printed (``-s``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from baton.dev.testing import LocalStack

EXAMPLES = 40  # per operation; derandomized, so CI runs the same cases


def service_url(stack: LocalStack, name: str) -> str:
    return next(p for p in stack.procs if p.name == name).url


@pytest.mark.parametrize("service", ["orchestrator", "context-store"])
def test_the_api_answers_as_its_openapi_document_says(stack: LocalStack, service: str) -> None:
    schema = schemathesis.openapi.from_url(f"{service_url(stack, service)}/openapi.json")
    statuses: Counter[str] = Counter()
    failures: list[tuple[str, str]] = []
    for result in schema.get_all_operations():
        op = result.ok()

        # A task's tenant comes from the API key or, without keys, the body:
        # a schema-valid body without one is rightly refused (400), so the
        # "positive data is accepted" check does not apply.
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(op.as_strategy())
        def run(case: Any) -> None:
            response = case.call_and_validate(excluded_checks=[checks.positive_data_acceptance])
            statuses[f"{case.operation.label} {response.status_code}"] += 1

        try:
            run()
        except Exception as exc:
            failures.append((op.label, str(exc)[:1500]))
    print(
        f"\nfuzz HTTP {service}: {sum(statuses.values())} requests {dict(sorted(statuses.items()))}"
    )
    assert not failures, failures
