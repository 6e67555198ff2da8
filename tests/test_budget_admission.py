"""Budgets that cannot be enforced (NaN, infinities, negative) are refused at
admission with ``invalid_field`` on both doors: the bus and the HTTP API."""

from __future__ import annotations

import math

import pytest

from baton.dev.testing import Client, LocalStack, uid
from tests.harness import http_post

UNENFORCEABLE = [math.nan, math.inf, -math.inf, -1.0]


async def test_a_non_finite_or_negative_max_usd_on_the_bus_fails_with_invalid_field(
    stack: LocalStack, client: Client
) -> None:
    tenant = "umbrella"
    ids = [uid() for _ in UNENFORCEABLE]
    for task_id, usd in zip(ids, UNENFORCEABLE, strict=True):
        body = {"tenant": tenant, "task_id": task_id, "input": "x", "budget": {"max_usd": usd}}
        await client.publish("chat", body)
    for task_id in ids:
        [failed] = await client.events(tenant, task_id)
        assert failed["type"] == "failed", failed
        error = failed["error"]
        assert error["code"] == "invalid_field" and "max_usd" in error["message"]
    # The refusal is specific: the same task with a finite budget runs.
    ok = await client.run("chat", {"tenant": tenant, "task_id": uid(), "input": "x",
                                   "budget": {"max_usd": 5.0}})  # fmt: skip
    assert ok["type"] == "completed"


@pytest.mark.parametrize("usd", UNENFORCEABLE)
async def test_a_non_finite_or_negative_max_usd_over_http_is_a_400_invalid_field(
    stack: LocalStack, usd: float
) -> None:
    # json.dumps writes NaN / Infinity literals, which Python's JSON parser (and so
    # the API) accepts: the check must be Baton's, not the JSON parser's.
    body = {"tenant": uid("b"), "input": "x", "budget": {"max_usd": usd}}
    err = http_post(f"{stack.orchestrator.url}/v1/tasks", body, expect=400)
    assert err["error"]["code"] == "invalid_field" and "max_usd" in err["error"]["message"]
