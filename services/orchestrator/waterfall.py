"""A step's waterfall, put together from its results' timings. Pure: no
clock; every time comes in with a message (``proto.messages.Timing``) or is
the ``received`` time the shell passes to a decision. Who measures what, and
what the phases cover: docs/architecture.md, "Step timings"."""

from __future__ import annotations

from typing import Any

from proto.messages import Phases, Timing


def arrived(t: Timing | None, received: float) -> Timing | None:
    """A worker's timing of a job or tool call, completed by its result's
    arrival: ``finished_at`` is ``received``, the trip is part of ``record``."""
    if t is None:
        return None
    trip = max(0.0, received - t.finished_at) if t.finished_at else 0.0
    return Timing(queued_at=t.queued_at, started_at=t.started_at,
                  first_token_at=t.first_token_at, finished_at=received,
                  phases=t.phases + Phases(record=trip))  # fmt: skip


def begun(queued_at: float) -> Timing:
    """A step just dispatched: queued, nothing measured yet."""
    return Timing(queued_at=queued_at)


def add_turn(step: Timing | None, turn: Timing | None, received: float) -> Timing:
    """The step's timing with one more model turn answered at ``received``:
    the first turn stamps ``started_at`` and ``first_token_at``; every turn
    adds its phases. A turn without a timing (a worker that sent none) still
    ends the step at ``received``."""
    s = step or Timing()
    if turn is None:
        return Timing(queued_at=s.queued_at, started_at=s.started_at,
                      first_token_at=s.first_token_at, finished_at=received,
                      phases=s.phases)  # fmt: skip
    return Timing(
        queued_at=s.queued_at or turn.queued_at,
        started_at=s.started_at or turn.started_at,
        first_token_at=s.first_token_at or turn.first_token_at,
        finished_at=received,
        phases=s.phases + turn.phases,
    )


def add_tool_wait(step: Timing | None, seconds: float) -> Timing:
    """The step's timing with ``seconds`` more waiting for its tool calls."""
    s = step or Timing()
    return Timing(queued_at=s.queued_at, started_at=s.started_at,
                  first_token_at=s.first_token_at, finished_at=s.finished_at,
                  phases=s.phases + Phases(tool=max(0.0, seconds)))  # fmt: skip


def event_fields(t: Timing | None) -> dict[str, Any]:
    """The ``step`` event's waterfall fields. Times taken by different
    machines' clocks are made ordered (queued <= started <= first token <=
    finished, each no earlier than the one before); a time not reached is
    left out, as is an empty ``phases``."""
    if t is None:
        return {}
    out: dict[str, Any] = {}
    last = 0.0
    for name in ("queued_at", "started_at", "first_token_at", "finished_at"):
        value: float = getattr(t, name)
        if value > 0.0:
            last = max(last, value)
            out[name] = round(last, 6)
    phases = t.phases.rounded()
    if phases.total() > 0.0:
        out["phases"] = phases
    return out
