"""Handler outcomes and the one rule that settles a delivery by them::

    return normally   -> ack
    raise Nak(delay)  -> nak, redelivered after ``delay`` seconds (doubling per
                         delivery with ``backoff``)
    raise Term(why)   -> term (poison: never redelivered), dead-lettered
    any other error   -> nak with back-off; on the last delivery, term + dead letter

Pure: no I/O (``consume.py`` performs what ``settlement`` chooses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from proto import codec


class Outcome(Exception):
    """Base of the outcomes a handler raises to settle its delivery."""


class Nak(Outcome):
    """Handler outcome: redeliver after ``delay`` seconds. ``backoff``: the
    delay doubles with each delivery (a peer that is down: a fixed delay
    would use up the deliveries in seconds and dead-letter the message)."""

    def __init__(self, delay: float = 1.0, reason: str = "", *, backoff: bool = False) -> None:
        super().__init__(reason or f"nak({delay})")
        self.delay = delay
        self.reason = reason
        self.backoff = backoff


class Term(Outcome):
    """Handler outcome: never redeliver this message. ``dead_letter`` keeps a
    copy on ``baton.dlq.<consumer>`` (poison); rejected client input that was
    already answered with a ``failed`` event sets it False."""

    def __init__(self, reason: str, *, dead_letter: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.dead_letter = dead_letter


MAX_BACKOFF = 30.0  # seconds: the longest a backed-off nak waits


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to do with a delivery once its handler is done."""

    action: Literal["ack", "nak", "term", "dead_letter"]
    delay: float = 0.0  # nak: redeliver after this many seconds
    reason: str = ""  # dead_letter: why


def settlement(error: BaseException | None, num_delivered: int, max_deliver: int) -> Settlement:
    """The one rule that turns a handler's outcome into ack / nak / term.

    Returned normally -> ack; ``Nak(delay)`` -> nak, but dead-lettered on the
    last delivery; ``Term`` -> term (dead-lettered unless it says not to); a
    ``codec.DecodeError`` (a body no delivery can read) -> dead-lettered at once; any
    other error -> nak with exponential back-off (0.5 s doubling, at most
    30 s), dead-lettered on the last delivery. ``max_deliver <= 0``: no last
    delivery."""
    last = 0 < max_deliver <= num_delivered
    if error is None:
        return Settlement("ack")
    if isinstance(error, codec.DecodeError):  # poison: no delivery will read it
        return Settlement("dead_letter", reason=f"undecodable: {error}")
    if isinstance(error, Nak):
        if last:
            return Settlement("dead_letter", reason=f"nak on last delivery: {error.reason}")
        if error.backoff:
            return Settlement("nak", delay=min(MAX_BACKOFF, error.delay * 2 ** (num_delivered - 1)))
        return Settlement("nak", delay=error.delay)
    if isinstance(error, Term):
        return Settlement("dead_letter" if error.dead_letter else "term", reason=error.reason)
    if last:
        return Settlement("dead_letter", reason=f"{type(error).__name__}: {error}")
    return Settlement("nak", delay=min(MAX_BACKOFF, 0.5 * 2 ** (num_delivered - 1)))
