"""Budgets that cannot be enforced (NaN, infinities, negative) are refused at
admission with ``invalid_field`` on both doors: the HTTP API, here on the
stack, and the bus (the conductor on the bus twin: tests/test_conductor_shell.py)."""

from __future__ import annotations

import math

import pytest

from baton.dev.testing import LocalStack, uid
from tests.harness import http_post

UNENFORCEABLE = [math.nan, math.inf, -math.inf, -1.0]


@pytest.mark.parametrize("usd", UNENFORCEABLE)
async def test_a_non_finite_or_negative_max_usd_over_http_is_a_400_invalid_field(
    stack: LocalStack, usd: float
) -> None:
    # json.dumps writes NaN / Infinity literals, which Python's JSON parser (and so
    # the API) accepts: the check must be Baton's, not the JSON parser's.
    body = {"tenant": uid("b"), "input": "x", "budget": {"max_usd": usd}}
    err = http_post(f"{stack.orchestrator.url}/v1/tasks", body, expect=400)
    assert err["error"]["code"] == "invalid_field" and "max_usd" in err["error"]["message"]
