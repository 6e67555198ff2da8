"""A model step's placement, decided at dispatch from what the run knows.

Pure: the step's need is estimated from the run (``RunState.context_tokens``:
the input's estimate, then each finished step's prompt + answer as its
worker's engine counted them), the agent's system prompt and offered tools,
and ``max_tokens``; the pools are seen through ``look`` (the conductor's
``PoolView.look``, a read of memory). ``scheduling`` predicts and chooses.
The answer is frozen into the step (``StepState.pool``, ``pool_reason``,
``prediction``): a retry, a tool turn or a replay reuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import msgspec

from proto.messages import PoolPrediction, ToolSpec

from .answers import Learnt, expected_output, learnt_for
from .fairness import estimate_tokens
from .pools import PoolSpec
from .scheduling import Decision, PoolNow, Prediction, StepNeed, choose, predict
from .state import RunState, StepState
from .workflows.spec import AgentSpec

Look = Callable[[str], tuple[PoolSpec, PoolNow]]

NEWEST_FLOOR = 64
"""Tokens a worker's window keeps at the least besides the system prompt
and tools: the newest message whole (``RunState.newest_tokens``), and never
fewer than these (the window's marker of omitted turns and framing)."""


def fixed_tokens(agent: AgentSpec, tools: Sequence[ToolSpec]) -> int:
    """The part of every prompt of the agent's that is not the session: its
    system prompt and the offered tools' schemas."""
    fixed = estimate_tokens(agent.system)
    if tools:
        fixed += estimate_tokens(msgspec.json.encode(list(tools)).decode())
    return fixed


def step_need(
    run: RunState,
    agent: AgentSpec,
    st: StepState,
    tools: Sequence[ToolSpec],
    learnt: Learnt = None,
) -> StepNeed:
    """What the step will ask of an engine: its window (the session so far
    with the agent's system prompt, cut to the step's window budget), the
    offered tools' schemas, ``max_tokens`` (the KV the worker reserves).
    It is expected to answer ``learnt`` tokens (the agent's answers so far,
    to prompts about as long when known, ``answers.AnswerLengths``; capped
    at ``max_tokens``), else all of ``max_tokens`` (the conservative guess)."""
    fixed = fixed_tokens(agent, tools)
    history = run.context_tokens
    if st.context_budget:
        history = min(history, max(0, st.context_budget - fixed))
    prompt = fixed + history
    length = learnt_for(learnt, prompt)
    return StepNeed(
        prompt_tokens=prompt,
        max_tokens=st.max_tokens,
        expected_output=expected_output(length, st.max_tokens),
        floor_tokens=fixed + min(history, max(run.newest_tokens, NEWEST_FLOOR)),
        learnt=length is not None,
    )


def place(need: StepNeed, pools: Sequence[str], target: float | None, look: Look) -> Decision:
    """The pool among ``pools`` (in the agent's order of preference)."""
    return choose([predict(need, *look(p)) for p in pools], target)


def move(need: StepNeed, pools: Sequence[str], current: str, look: Look) -> Decision:
    """A worker of ``current`` found the step's prompt too long: the cheapest
    of ``pools`` with a longer context than ``current``'s (``pool`` None when
    there is none). Its window is at least what did not fit."""
    limit = look(current)[0].max_model_len
    at_least = max(need.prompt_tokens, limit - need.max_tokens + 1)
    need = replace(need, prompt_tokens=at_least, floor_tokens=max(need.floor_tokens, at_least))
    larger = [predict(need, *look(p)) for p in pools if p != current]
    larger = [p for p in larger if p.max_model_len > limit]
    d = choose(larger, None) if larger else Decision(None, "too_long", ())
    return Decision(d.pool, "moved" if d.pool is not None else "too_long", d.predictions)


def frozen(p: Prediction) -> PoolPrediction:
    """A prediction as it travels on the step's events and stays in the run."""
    return PoolPrediction(
        kv_tokens=p.kv_tokens,
        wait_s=round(p.wait_s, 3),
        run_s=round(p.run_s, 3),
        gpu_seconds=round(p.gpu_seconds, 4),
        cost_usd=round(p.cost_usd, 8),
        cold=p.cold,
        output_tokens=p.output_tokens,
        learnt=p.learnt,
    )


def refusal(decision: Decision, need: StepNeed) -> str:
    """Why no pool takes the step, for its ``prompt_too_long`` error."""
    longest = max((p.max_model_len for p in decision.predictions), default=0)
    names = ", ".join(p.pool for p in decision.predictions)
    least = need.floor_tokens + need.max_tokens
    return (
        f"the step needs at least {least} tokens of context (window + max_tokens); "
        f"the longest of its pools ({names}) holds {longest}"
    )
