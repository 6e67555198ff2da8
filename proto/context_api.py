"""The context store's request-reply contract: one table, op → (request
type, reply type). The server dispatches from it, the one client
(``baton.context_client``) types its replies by it, and the AsyncAPI
document lists its channels from it. Pure: types only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from proto import messages as msg
from proto import streams
from proto.subjects import CONTEXT_OPS

Q = TypeVar("Q")
P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Endpoint(Generic[Q, P]):
    """One op on ``baton.ctx.<op>.<tenant>``: its request and reply types,
    and what it does (the AsyncAPI channel's description)."""

    op: str
    request: type[Q]
    reply: type[P]
    summary: str


# One row an op: its name (the subject's token), request, reply, summary.
# fmt: off
APPEND: Final = Endpoint("append", msg.ContextAppend, msg.ContextAppendReply,
                         "Request-reply: append to a session; the reply carries a signed ref.")
ANSWER: Final = Endpoint("answer", msg.ContextAnswer, msg.ContextAppendReply,
                         "Request-reply: append a job's answer and publish its result; the reply "
                         "to a stored answer is JetStream's ack of the result, a refusal the "
                         "store's.")
WINDOW: Final = Endpoint("window", msg.WindowRequest, msg.WindowReply,
                         "Request-reply: resolve a signed ref into a token-budgeted window.")
GET: Final = Endpoint("get", msg.ContextGet, msg.GetReply,
                      "Request-reply: read a session a page at a time, or one attachment.")
FORK: Final = Endpoint("fork", msg.ContextFork, msg.ForkReply,
                       "Request-reply: a child session sharing a ref's prefix without copying it.")
SUMMARIZE: Final = Endpoint("summarize", msg.ContextSummarize, msg.ContextAppendReply,
                            "Request-reply: store a summary of a session's older turns.")
ATTACH: Final = Endpoint("attach", msg.ContextAttach, msg.AttachReply, "Request-reply: store an "
                         f"attachment (stream {streams.CONTEXT_ATTACHMENTS.name}).")
DELETE: Final = Endpoint("delete", msg.ContextDelete, msg.DeleteReply, "Request-reply: erase a "
                         "session (with its forks and attachments) or a tenant.")
STATS: Final = Endpoint("stats", msg.ContextStats, msg.StatsReply,
                        "Request-reply: counts for a session or a tenant.")
# fmt: on

# Every op, in the order the AsyncAPI document lists them.
ENDPOINTS: Final[dict[str, Endpoint[Any, Any]]] = {
    e.op: e for e in (APPEND, ANSWER, WINDOW, GET, FORK, SUMMARIZE, ATTACH, DELETE, STATS)
}
assert set(ENDPOINTS) == set(CONTEXT_OPS)
