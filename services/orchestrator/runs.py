"""Durable run state: one KV entry per task in bucket ``baton-runs``, key
``<tenant>.<task_id>``, updated step by step with compare-and-set so several
orchestrator replicas can advance the same run safely.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from proto import codec
from proto.messages import Budget, ContextRef, ErrorInfo, Usage

TERMINAL = frozenset({"completed", "failed", "cancelled"})


class StepState(msgspec.Struct, omit_defaults=True, kw_only=True):
    agent: str
    pool: str
    session: str
    status: str = "dispatched"  # dispatched | done | failed
    max_tokens: int = 0
    context_budget: int = 0  # window tokens, set when the task has a token budget
    attempt: int = 1  # dispatches so far (a timeout dispatches again)
    dispatched_at: float = 0.0
    finished_at: float = 0.0
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    output: str = ""
    worker: str = ""
    cached_tokens: int = 0
    ref: ContextRef | None = None  # the context the step reads; after it, its answer


class RunState(msgspec.Struct, omit_defaults=True, kw_only=True):
    tenant: str
    task_id: str
    session: str
    workflow: str
    task_seq: int  # stream sequence of the task message that created the run
    status: str = "running"
    budget: Budget | None = None
    metadata: dict[str, object] = {}
    steps: dict[str, StepState] = {}
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    output: str = ""
    error: ErrorInfo | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def key(self) -> str:
        return run_key(self.tenant, self.task_id)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def run_key(tenant: str, task_id: str) -> str:
    return f"{tenant}.{task_id}"


class RunConflict(Exception):
    """The run changed under us too many times."""


class RunStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, run: RunState) -> tuple[RunState, bool]:
        """Store a new run; if one exists, return it and False."""
        run.created_at = run.updated_at = time.time()
        try:
            await self.kv.create(run.key, codec.encode(run))
            return run, True
        except nats.js.errors.KeyWrongLastSequenceError:
            existing = await self.get(run.tenant, run.task_id)
            if existing is None:  # deleted in between: try once more
                await self.kv.create(run.key, codec.encode(run))
                return run, True
            return existing, False

    async def get(self, tenant: str, task_id: str) -> RunState | None:
        try:
            entry = await self.kv.get(run_key(tenant, task_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return codec.decode(entry.value, RunState)

    async def update(
        self, tenant: str, task_id: str, change: Callable[[RunState], bool]
    ) -> RunState | None:
        """Apply ``change`` (which returns False to leave the run untouched)
        with compare-and-set, retrying on conflicts. None if no such run."""
        key = run_key(tenant, task_id)
        for _ in range(50):
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
            assert entry.value is not None
            run = codec.decode(entry.value, RunState)
            if not change(run):
                return run
            run.updated_at = time.time()
            try:
                await self.kv.update(key, codec.encode(run), last=entry.revision)
                return run
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise RunConflict(key)
