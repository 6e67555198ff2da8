"""The context store's request-reply contract: one table, op → (request
type, reply type). The server dispatches from it, the one client
(``baton.context_client``) types its replies by it, and the AsyncAPI
document lists its channels from it; ``answer_target`` reads an ``answer``
request for the store and its twins. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from proto import keys, streams, subjects
from proto import messages as msg
from proto.ids import is_valid_id
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
                         "Request-reply: append a job's answer or a tool's output and publish its "
                         "result; the reply "
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


@dataclass(frozen=True, slots=True)
class AnswerTarget:
    """Where an ``answer`` request's parts go (``msg.ContextAnswer``): the
    session and the append's ``msg_id``, the result's subject and
    ``Nats-Msg-Id``, and the result itself (its ``ref`` set once stored)."""

    session: str
    task_id: str
    append_id: str
    subject: str
    result_id: str
    result: msg.InferenceResult | msg.ToolResult


def answer_target(req: msg.ContextAnswer) -> AnswerTarget:
    """The one reading of an ``answer`` request, for the store and its twins.

    Raises:
        ValueError: not exactly one result; a result naming another tenant
            than the request (whose tenant the store checked is the
            subject's), or a session or task that is not an id; a model
            step's result that is an error or a pre-warm (nothing to append).
    """
    res = req.result if req.tool_result is None else req.tool_result
    if (req.result is None) == (req.tool_result is None):
        raise ValueError("an answer carries one result: a model step's or a tool call's")
    assert res is not None
    if res.tenant != req.tenant:
        raise ValueError("the result's tenant is not the request's")
    if not (is_valid_id(res.session) and is_valid_id(res.task_id)):
        raise ValueError("the result's session or task is not an id")
    if isinstance(res, msg.ToolResult):
        return AnswerTarget(res.session, res.task_id, keys.tool_output(res.call_id),
                            subjects.tool_result(res.tenant, res.task_id),
                            keys.tool_result(res.call_id, req.attempt), res)  # fmt: skip
    if res.error is not None or res.warm:
        raise ValueError("a model step's answer needs its output, not an error")
    return AnswerTarget(res.session, res.task_id, keys.answer(res.job_id),
                        subjects.result(res.tenant, res.task_id),
                        keys.result(res.job_id, req.attempt), res)  # fmt: skip
