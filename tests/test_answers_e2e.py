"""The answer length learnt per agent, on real processes (nats-server,
orchestrator, a simulator worker whose agent answers 12 of its 64
``max_tokens``): the first steps are predicted at ``max_tokens``; once
``BATON_ANSWER_MIN_SEEN`` answers are seen, a step's ``started`` event
carries the learnt length, and its predicted GPU-seconds follow it while the
KV need still counts ``max_tokens``."""

from __future__ import annotations

from typing import Any

import pytest

from baton.dev.testing import Client, LocalStack, uid
from tests.harness import one_step

WORKFLOW = one_step("ask", max_tokens=64, pool="small")
POOLS = {"small": {"max_model_len": 2048, "prefill_tps": 20000, "decode_tps": 400}}


@pytest.fixture
def short_answers(own_stack: LocalStack) -> LocalStack:
    own_stack.start(
        workers=0, workflows={"ask.yaml": WORKFLOW}, pools=POOLS, BATON_ANSWER_MIN_SEEN="3"
    )
    own_stack.worker(
        BATON_POOL="small", BATON_MAX_MODEL_LEN="2048", BATON_SIM_ANSWER_TOKENS="12"
    ).wait_ready()
    return own_stack


async def _step(client: Client, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    body = {"tenant": "initech", "input": text, "task_id": uid()}
    await client.publish("ask", body, msg_id=body["task_id"])
    events = await client.events("initech", body["task_id"], timeout=40)
    assert events[-1]["type"] == "completed", events[-1]
    steps = [e for e in events if e["type"] == "step" and e.get("step") == "r1.answer"]
    return steps[0], steps[-1]


async def test_a_step_is_predicted_at_its_agent_learnt_answer_length(
    short_answers: LocalStack, own_client: Client
) -> None:
    first: list[dict[str, Any]] = []
    for i in range(3):
        started, done = await _step(own_client, f"question {i}")
        assert done["usage"]["completion_tokens"] == 12
        first.append(started["prediction"])
    assert all(p["output_tokens"] == 64 and not p.get("learnt") for p in first)
    started, done = await _step(own_client, "question 3")
    p = started["prediction"]
    assert (p["output_tokens"], p["learnt"]) == (12, True)
    assert p["kv_tokens"] == first[0]["kv_tokens"] > 64  # still window + max_tokens
    assert p["gpu_seconds"] < first[0]["gpu_seconds"]
    assert done["prediction"] == p  # the done event carries it too
