"""W3C ``traceparent`` propagation across every hop.

The current traceparent lives in a contextvar: the transport sets it from an
incoming message's header (``child_span``) and stamps it on every outgoing
message.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
from collections.abc import Iterator

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)


# Trace and span ids need to be unique, not secret: a PRNG draw instead of
# os.urandom, which was a syscall on every message every service sends.
_bits = random.Random().getrandbits


def new_traceparent() -> str:
    """Start a new trace (sampled)."""
    return f"00-{_bits(128) or 1:032x}-{_bits(64) or 1:016x}-01"


def child_of(parent: str | None) -> str:
    """A new span in ``parent``'s trace, or a new trace when ``parent`` is unusable."""
    parts = (parent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return f"00-{parts[1]}-{_bits(64) or 1:016x}-{parts[3]}"
    return new_traceparent()


def trace_id(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None


def current() -> str | None:
    return _current.get()


@contextlib.contextmanager
def child_span(parent: str | None) -> Iterator[str]:
    """Run the block in a new span of ``parent``'s trace (a new trace when
    ``parent`` is unusable); yields that span's traceparent."""
    span = child_of(parent)
    token = _current.set(span)
    try:
        yield span
    finally:
        _current.reset(token)
