"""A run's state as stored in bucket ``baton-runs``: the types every decision
reads and writes. Pure: msgspec and ``proto`` only, no bus, no clock — the
decision modules (``transitions.py``, ``workflows/``) import it, and
``tests/test_fences.py`` keeps it that way. ``runs.py`` stores it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from proto.messages import Budget, ContextRef, ErrorInfo, PoolPrediction, Timing, Usage

# tools: waiting for its calls; waiting_input: an input step waiting for a human
StepStatus = Literal["dispatched", "tools", "waiting_input", "done", "failed"]
CallStatus = Literal["dispatched", "done"]
RunStatus = Literal["running", "completed", "failed", "cancelled", "erased"]
ERASED: RunStatus = "erased"  # a tombstone: the task was erased with its session
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", ERASED})


class CallState(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One tool call of a step: a recorded sub-step (``t<turn>c<i>``)."""

    tool: str
    arguments: str
    call_id: str  # the model's id of the call
    status: CallStatus = "dispatched"
    dispatched_at: float = 0.0
    outcome: str = ""
    preview: str = ""  # the start of its result, as the agent reads it
    cpu_seconds: float = 0.0
    seconds: float = 0.0
    ref: ContextRef | None = None  # the session with its result
    timing: Timing | None = None  # its waterfall, once answered


class StepState(msgspec.Struct, omit_defaults=True, kw_only=True):
    agent: str
    pool: str
    session: str
    status: StepStatus = "dispatched"
    max_tokens: int = 0
    context_budget: int = 0  # window tokens, set when the task has a token budget
    attempt: int = 1  # dispatches so far (a timeout dispatches again)
    dispatched_at: float = 0.0  # of the current turn or attempt
    deadline: float = 0.0  # when the current attempt times out
    finished_at: float = 0.0
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    output: str = ""
    worker: str = ""
    cached_tokens: int = 0
    ref: ContextRef | None = None  # the context the step reads; after it, its answer
    turn: int = 0  # model turns that called tools so far (each a job of its own)
    calls: dict[str, CallState] = {}  # its tool calls by ``t<turn>c<i>``
    input: bool = False  # an input step: it waits for a human (no agent, no job)
    answered_by: str = ""  # an input step's answer: "human" or "default" (its timeout)
    timing: Timing | None = None  # its waterfall so far (waterfall.py)
    # The run session's context the step was dispatched from (a parallel
    # branch: what its fork was made of): where a fork from this step starts.
    origin: ContextRef | None = None
    carried: bool = False  # done in the run this one was forked from, not run again
    # Its placement, decided once at dispatch and kept by retries and tool
    # turns: why ``pool`` (scheduling.Reason; "" = the agent's one pool, no
    # catalogue consulted) and what was predicted there.
    pool_reason: str = ""
    prediction: PoolPrediction | None = None
    moves: int = 0  # dispatches to a larger pool after prompt_too_long (not retries)
    # The tools its model turns are offered, by name, and the tool choice:
    # frozen at its first dispatch, so a retry, its next turn, a move or a
    # replay offers what the first attempt did whatever the catalog became.
    # None: a run stored before steps froze them (the catalog as it is now).
    tools: list[str] | None = None
    tool_choice: str = ""
    # Placed on a pool with no ready worker (scaled to zero, or loading): the
    # seconds it was expected to wait for one (its ``waiting_capacity``
    # event); its deadline runs from then. 0: a worker was ready.
    capacity_wait: float = 0.0


class RunState(msgspec.Struct, omit_defaults=True, kw_only=True):
    tenant: str
    task_id: str
    session: str
    workflow: str
    task_seq: int  # stream sequence of the task message that created the run
    status: RunStatus = "running"
    budget: Budget | None = None
    max_tokens: int | None = None  # the task's cap on each step's answer
    temperature: float | None = None  # the task's temperature, over the agents'
    metadata: dict[str, object] = {}
    steps: dict[str, StepState] = {}
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    # Pre-warms charged to the run (in ``usage`` and ``cost_usd``): their
    # cost by warm job id, so a warm's charge delivered again adds nothing.
    warms: dict[str, float] = {}
    output: str = ""
    error: ErrorInfo | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    # The W3C traceparent of the caller's span the task arrived in ("" when
    # none): every replica derives the task's spans from it (spans.py).
    trace: str = ""
    forked_from: str = ""  # a fork: the task it was forked from...
    forked_at: str = ""  # ...and the step it runs again
    # Tokens of the run's session as far as the run knows (the input's
    # estimate, then each finished step's prompt + answer as the worker
    # counted them): what the next step's window is predicted from.
    context_tokens: int = 0
    # ...and of its newest message, which a worker's window keeps whole.
    newest_tokens: int = 0

    @property
    def key(self) -> str:
        return run_key(self.tenant, self.task_id)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def run_key(tenant: str, task_id: str) -> str:
    return f"{tenant}.{task_id}"
