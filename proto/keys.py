"""Idempotency keys: the one place each deterministic id is spelled.

Every side effect Baton may perform twice (after a crash, a redelivery, a
retry) carries one of these ids, so the second time is a no-op: JetStream
de-duplicates a publish by ``Nats-Msg-Id``, the context store an append by
its ``msg_id``. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib


def event(tenant: str, task_id: str, key: str) -> str:
    """``Nats-Msg-Id`` of a task event; ``key`` is one of the ``*_event`` keys."""
    return f"{tenant}.{task_id}.{key}"


ACCEPTED = "accepted"
COMPLETED = "completed"
FAILED = "failed"


def step_event(step: str, status: str) -> str:
    """Event key of a step's ``started`` / ``done`` event."""
    return f"step.{step}.{status}"


def warm(tenant: str, task_id: str, step: str, refresh: int = 0) -> str:
    """The id of the pre-warm of a step that has not started: one per step;
    ``refresh`` n > 0: the n-th warm that keeps it warm (a message of its own)."""
    base = f"{tenant}.{task_id}.{step}.warm"
    return f"{base}.{refresh}" if refresh else base


def job(tenant: str, task_id: str, step: str) -> str:
    """The id of a step's inference job (stable across retries)."""
    return f"{tenant}.{task_id}.{step}"


def _nth(key: str, attempt: int) -> str:
    return key if attempt == 1 else f"{key}#{attempt}"


def job_message(job_id: str, attempt: int) -> str:
    """``Nats-Msg-Id`` of a job's dispatch: a retry after a timeout is a new
    message, the job id (so the answer's id) stays the same."""
    return _nth(job_id, attempt)


def generation(job_id: str, delivery: int) -> str:
    """The engine request id of one delivery of a job."""
    return f"{job_id}#{delivery}"


def answer(job_id: str) -> str:
    """Context-store ``msg_id`` of a job's answer (appended once)."""
    return f"{job_id}:out"


def result(job_id: str, attempt: int = 1) -> str:
    """``Nats-Msg-Id`` of a job's result, per dispatch: a redelivered job's
    result is de-duplicated, a retry's (the answer stored already, the first
    result lost or dead-lettered) is a new message the orchestrator sees."""
    return _nth(f"{job_id}:result", attempt)


def task_input(task_id: str) -> str:
    """Context-store ``msg_id`` of a task's input."""
    return f"{task_id}:input"


def fan_in(task_id: str, step: str) -> str:
    """Context-store ``msg_id`` of the branches' answers brought home after
    ``step``. Task-scoped: a session continued by another task runs the same
    step ids, and a msg_id is unique in the whole session."""
    return f"{task_id}.{step}:fanin"


def input_answer(task_id: str, step: str) -> str:
    """Context-store ``msg_id`` of the answer to an ``input`` step (the human's
    or, past its timeout, the declared default: whichever is stored first)."""
    return f"{task_id}.{step}:input"


def input_message(task_id: str, step: str) -> str:
    """``Nats-Msg-Id`` of an answer the HTTP API publishes for a step (a
    tenant's own NATS client may use it too): one answer per step and task."""
    return f"{task_id}.{step}.input"


def run_timer(tenant: str, task_id: str) -> str:
    """``Nats-Msg-Id`` of a run's durable watchdog timer."""
    return f"{tenant}.{task_id}.timer"


def dead_letter(consumer: str, stream_seq: int) -> str:
    """``Nats-Msg-Id`` of the dead-letter copy of a stream message."""
    return f"{consumer}:{stream_seq}"


def task_fallback(stream_seq: int) -> str:
    """The task id of a task submitted without one: its stream sequence."""
    return f"seq{stream_seq}"


def tool_call(tenant: str, task_id: str, step: str, call: str) -> str:
    """The id of one tool call (its ``Nats-Msg-Id``): ``call`` is its index
    within the step's tool calls (``t<turn>c<i>``), stable across redeliveries."""
    return f"{tenant}.{task_id}.{step}.{call}"


def tool_output(call_id: str) -> str:
    """Context-store ``msg_id`` of a tool call's result (appended once)."""
    return f"{call_id}:out"


def tool_result(call_id: str, attempt: int = 1) -> str:
    """``Nats-Msg-Id`` of a tool call's ``ToolResult``, per dispatch (as
    ``result``)."""
    return _nth(f"{call_id}:result", attempt)


def job_turn(job_id: str, turn: int) -> str:
    """The id of a step's job after ``turn`` rounds of tool calls: each model
    turn is a job of its own (its answer and result get their own ids)."""
    return job_id if turn == 0 else f"{job_id}~{turn}"


def call_key(turn: int, index: int) -> str:
    """A tool call's key within its step."""
    return f"{call_prefix(turn)}{index}"


def call_prefix(turn: int) -> str:
    """What the keys of a step's tool calls in model turn ``turn`` start with."""
    return f"t{turn}c"


def fork_session(tenant: str, task_id: str, step: str) -> str:
    """The session a parallel branch forks into (a valid subject token, the
    same on every replica and every redelivery)."""
    return "fk" + hashlib.sha1(f"{tenant}.{task_id}.{step}".encode()).hexdigest()[:30]


def seed(task_id: str) -> str:
    """Context-store ``msg_id`` of the history an OpenAI-style request brings
    (the messages before its last one)."""
    return f"{task_id}:seed"


def token_delta(job_id: str, attempt: str, index: int) -> str:
    """``Nats-Msg-Id`` of one batch of streamed tokens of a job's attempt."""
    return f"{job_id}#{attempt}.{index}"


def dead_letter_replay(stream_seq: int) -> str:
    """``Nats-Msg-Id`` of a dead letter replayed onto its original subject."""
    return f"dlq-replay:{stream_seq}"


def console_login(nonce: str) -> str:
    """``Nats-Msg-Id`` of the audit record of a console login by link: the
    stream's de-duplication makes each link's token work once."""
    return f"console-login:{nonce}"
