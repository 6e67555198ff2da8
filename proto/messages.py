"""Every message on the bus, as msgspec Structs.

Public (v1 contract, clients depend on it): ``TaskSubmit`` and the four task
events. Internal (Baton's own, may change): inference jobs and results,
context requests and replies, worker heartbeats, cancellations.

All bodies are MessagePack maps with string keys, except ``ContextRef`` which
is a compact array so a pointer stays tens of bytes.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from proto.errors import LAYER_OF, ErrorCode, Layer
from proto.ids import Id

# --------------------------------------------------------------------------
# Public: task submission
# --------------------------------------------------------------------------


class Budget(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Limits a task may spend. Unset means unlimited."""

    max_tokens: int | None = None
    max_usd: float | None = None


class TaskSubmit(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Body of ``baton.tasks.<workflow>``."""

    tenant: Id
    input: str
    task_id: Id | None = None
    session: Id | None = None
    budget: Budget | None = None
    metadata: dict[str, Any] = {}
    # Generation options for every step of the task (the OpenAI API maps
    # ``max_tokens`` and ``temperature`` here): a cap on each step's answer,
    # never above the agent's own ``max_tokens``, and the sampling temperature.
    max_tokens: int | None = None
    temperature: float | None = None


# --------------------------------------------------------------------------
# Public: task events on ``baton.events.<tenant>.<task_id>``
# --------------------------------------------------------------------------


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gpu_seconds: float = 0.0
    tool_cpu_seconds: float = 0.0  # CPU time of the task's sandboxed tool calls

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            gpu_seconds=self.gpu_seconds + other.gpu_seconds,
            tool_cpu_seconds=self.tool_cpu_seconds + other.tool_cpu_seconds,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def finite_usage(u: Usage) -> bool:
    """msgspec accepts NaN and inf floats: a result's usage must be finite and
    non-negative before it is added to a run (NaN cost is never over budget)."""
    inf = float("inf")
    return (
        u.prompt_tokens >= 0
        and u.completion_tokens >= 0
        and 0.0 <= u.gpu_seconds < inf
        and 0.0 <= u.tool_cpu_seconds < inf
    )


class ErrorInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    """``{code, message, layer}``: the code is stable API (an unknown one is a
    decode error), the layer follows from it, the message is for humans."""

    code: ErrorCode
    message: str
    layer: Layer
    # rate_limited: seconds after which the same request may be accepted.
    retry_after: float | None = None

    @classmethod
    def of(cls, code: ErrorCode, message: str, retry_after: float | None = None) -> ErrorInfo:
        """The error ``code`` with its layer (the one way to build one)."""
        return cls(code=code, message=message, layer=LAYER_OF[code], retry_after=retry_after)


# A step event: the step (or one of its tool calls) started, finished, a
# tool call failed (its error code in ``outcome``; the run goes on), a step
# failed (its error code in ``outcome``; the task's ``failed`` event follows),
# or an input step waits for the tenant's answer.
StepEventStatus = Literal["started", "done", "failed", "waiting_input", "waiting_capacity"]


class Phases(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Seconds a step or a tool call spent in each phase: the bars of a run's
    waterfall. A phase it did not go through is absent (0). A step that called
    tools adds up every model turn's phases, and ``tool`` is the time it
    waited for its calls (they run in parallel).

    ``queue``: published until a worker took it. ``context``: fetching the
    context window (a tool call: looking up a result stored before).
    ``admission``: waiting for room in the KV cache. ``prefill``: generation
    start until the first token. ``decode``: first token until the last.
    ``tool``: a tool call's run; a step's wait for its calls. ``record``:
    storing the answer and delivering the result to the orchestrator."""

    queue: float = 0.0
    context: float = 0.0
    admission: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    tool: float = 0.0
    record: float = 0.0

    def __add__(self, other: Phases) -> Phases:
        return Phases(**{f: getattr(self, f) + getattr(other, f) for f in PHASES})

    def total(self) -> float:
        return sum(getattr(self, f) for f in PHASES)

    def rounded(self) -> Phases:
        """To the microsecond, never negative (clocks of two machines differ);
        a zero phase is left at its default, so that it is not encoded
        (msgspec omits a default by identity, not by value, for floats)."""
        values = {f: round(getattr(self, f), 6) for f in PHASES}
        return Phases(**{f: v for f, v in values.items() if v > 0.0})


PHASES: tuple[str, ...] = Phases.__struct_fields__


class Timing(msgspec.Struct, omit_defaults=True, kw_only=True):
    """When a job (one model turn of a step) or a tool call was queued,
    started, made its first token and finished, in epoch seconds (0: not
    reached), with the phases between. Measured where each happens: the
    orchestrator stamps ``queued_at`` at dispatch (the job's
    ``published_at``); the worker the rest, by its clock, ``finished_at``
    just before it publishes the result. Internal (results, run state); the
    ``step`` events carry the same fields flat."""

    queued_at: float = 0.0
    started_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    phases: Phases = msgspec.field(default_factory=Phases)


def finite_timing(t: Timing) -> bool:
    """A result's timing must be finite and non-negative to be kept (msgspec
    accepts NaN and inf): a bad clock loses the timing, never the result."""
    values = (t.queued_at, t.started_at, t.first_token_at, t.finished_at,
              *(getattr(t.phases, f) for f in PHASES))  # fmt: skip
    return all(0.0 <= v < float("inf") for v in values)


class _Event(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True):
    task_id: str
    session: str = ""
    tenant: str = ""
    ts: float = 0.0


class Accepted(_Event, tag="accepted"):
    workflow: str = ""


class PoolPrediction(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What the orchestrator predicted of a model step on the pool it chose,
    before dispatch (services/orchestrator/scheduling.py): the KV-cache tokens it
    needs (window + ``max_tokens``), the seconds it waits for a slot (a cold
    start included when the pool is at zero), runs, the GPU-seconds it is
    charged and their cost. ``output_tokens``: the answer length the run
    time was predicted with; ``learnt``: from the agent's past answers (an
    upper quantile, at most ``max_tokens``), else ``max_tokens`` itself (the
    KV-cache need always counts ``max_tokens``)."""

    kv_tokens: int
    wait_s: float
    run_s: float
    gpu_seconds: float
    cost_usd: float
    cold: bool = False
    output_tokens: int = 0
    learnt: bool = False


class Step(_Event, tag="step"):
    """A step of the run (``step``, by ``agent``) or one of its tool calls
    (``tool``, ``call``) ``started``, ended (``done``, or ``failed`` with the
    error code in ``outcome``), or an input step is ``waiting_input``.

    ``waiting_capacity`` (after ``started``): the step's pool has no ready
    worker (scaled to zero, or still loading); its job waits in the pool's
    queue, whose backlog wakes the pool, and runs when a worker is up.
    ``estimate_s``: the seconds it is expected to wait (the pool's cold
    start, or what is left of one).

    A step's or tool call's ``done`` / ``failed`` carries its waterfall:
    ``queued_at`` (first dispatched), ``started_at`` (a worker took it),
    ``first_token_at`` (its first generated token; not on tool calls),
    ``finished_at`` (its answer reached the orchestrator), epoch seconds,
    ordered queued <= started <= first_token <= finished; and ``phases``
    (seconds per phase: queue, context, admission, prefill, decode, tool,
    record; see ``Phases``), which add up to about finished - queued. A time
    not reached or not measured is absent."""

    step: str
    agent: str
    status: StepEventStatus
    usage: Usage | None = None
    tool: str | None = None  # a tool call of the step: the tool's name
    call: str | None = None  # which call of the step (``t<turn>c<i>``)
    outcome: str | None = None  # a finished tool call: "ok" or its error code
    seconds: float | None = None  # a finished tool call: how long it ran
    prompt: str | None = None  # waiting_input: what the human is asked
    deadline: float | None = None  # waiting_input: when the default answer is taken
    answered_by: str | None = None  # an input step's done: "human" or "default"
    # A finished step or tool call: its waterfall (the docstring). A step
    # dispatched again after a timeout also spent the lost attempt, in no phase.
    queued_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    phases: Phases | None = None
    # A model step's placement (``started``, and again on ``done`` / ``failed``):
    # the pool, why it was chosen (cheapest, spill_saturated, spill_cold,
    # fastest, largest, moved, only), and the prediction it was chosen by.
    pool: str | None = None
    pool_reason: str | None = None
    prediction: PoolPrediction | None = None
    estimate_s: float | None = None  # waiting_capacity: seconds until a worker is expected


class Completed(_Event, tag="completed"):
    output: str
    usage: Usage
    cost_usd: float


class Failed(_Event, tag="failed"):
    error: ErrorInfo
    partial_output: str | None = None


TaskEvent = Accepted | Step | Completed | Failed


# --------------------------------------------------------------------------
# Public: a human's answer on ``baton.input.<task_id>``
# --------------------------------------------------------------------------


class InputAnswer(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Body of ``baton.input.<task_id>``: the answer to the task's ``input``
    step that waits (its ``step`` event has status ``waiting_input``). Name
    the ``step`` (from that event) so that a repeated answer can never answer
    a later input step; the first answer to a step wins, later ones are
    ignored. ``tenant``, when given, must be the publisher's own."""

    answer: str
    step: str | None = None
    tenant: Id | None = None


# --------------------------------------------------------------------------
# Public: token deltas on ``baton.tokens.<tenant>.<task_id>``
# --------------------------------------------------------------------------


class TokenDelta(msgspec.Struct, kw_only=True):
    """Text a step generated since the previous delta (batched by time).

    Durable in stream ``BATON_TOKENS``: the stream sequence of a delta is its
    per-task resume cursor (``baton.tokens.<tenant>.<task_id>`` holds one
    task's deltas in order, so "from sequence N" misses and repeats nothing).
    ``attempt`` names one generation of the step (opaque); within it ``index``
    counts the deltas from 0 and ``offset`` is the length (in characters) of
    the text before this delta, so a gap is visible. The deltas of an attempt
    concatenated are exactly the answer stored in the context store; its last
    delta has ``final`` set. A step generated again (its worker died, or its
    timeout re-dispatched it) starts over under a new ``attempt``: drop what
    the earlier one sent."""

    task_id: str
    tenant: str
    step: str
    agent: str
    attempt: str = ""
    index: int = 0
    offset: int = 0
    text: str = ""
    final: bool = False
    ts: float = 0.0


# --------------------------------------------------------------------------
# Internal: context
# --------------------------------------------------------------------------


class ToolCall(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One call a model asked for: ``arguments`` is JSON text (as in the
    OpenAI format), checked against the tool's schema before it runs."""

    id: str
    name: str
    arguments: str = "{}"


class ToolSpec(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A tool as offered to a model (the OpenAI ``function`` shape):
    ``parameters`` is a JSON schema, as JSON text."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'


class ChatMessage(msgspec.Struct, omit_defaults=True, kw_only=True):
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] = []  # an assistant turn that calls tools
    tool_call_id: str | None = None  # a tool message: the call it answers


class ContextRef(msgspec.Struct, array_like=True, frozen=True):
    """A signed pointer to the first ``version`` messages of one incarnation
    of a session. ``incarnation`` is the nonce of the session's first record:
    a session erased and written again under the same id is a new
    incarnation, so refs to the old one stay dead."""

    tenant: str
    session: str
    version: int
    sig: bytes
    incarnation: bytes = b""


class ForkOrigin(msgspec.Struct, array_like=True, frozen=True):
    """Where a forked session starts: the first ``version`` messages of
    ``session`` (same tenant, incarnation ``incarnation``). The child stores
    only its own messages."""

    session: str
    version: int
    incarnation: bytes = b""


class Summary(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A stored summary standing in for messages ``[start, covers)``."""

    covers: int
    content: str


class StoredAppend(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One record on ``baton.ctxlog.<tenant>.<session>``: an atomic append.

    The log is the session's only state, so metadata are records too: the
    first record of a fork carries ``fork``; a parent notes each ``child`` it
    was forked into (so deleting it deletes them); ``summary`` stores a
    summary of older turns. Such records carry no ``messages``. The first
    record of a session carries its ``incarnation`` nonce."""

    msg_id: str
    messages: list[ChatMessage] = []
    ts: float = 0.0
    incarnation: bytes | None = None
    fork: ForkOrigin | None = None
    child: str | None = None
    summary: Summary | None = None


class ContextAppend(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Append ``messages`` to a session. ``msg_id`` makes the append idempotent.
    ``system`` seeds a new (empty) session with a system prompt. ``base``: the
    ref the messages answer; the append is refused (``unknown_session``)
    unless the session is still that ref's incarnation, so an answer generated
    while its session was erased does not write the session again."""

    tenant: Id
    session: Id
    msg_id: str
    messages: list[ChatMessage]
    system: str | None = None
    base: ContextRef | None = None


class ContextAppendReply(msgspec.Struct, omit_defaults=True, kw_only=True):
    ref: ContextRef | None = None
    length: int = 0
    duplicate: bool = False
    error: ErrorInfo | None = None


class WindowRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Resolve ``ref`` into the messages that fit ``budget_tokens``.

    ``done_msg_id``: if a message was already appended under this id (a
    redelivered job whose answer is stored), the reply carries it as
    ``existing`` so the caller does not generate it again."""

    tenant: Id
    ref: ContextRef
    budget_tokens: int
    done_msg_id: str | None = None
    strategy: str = "newest"  # "newest" | "summary_tail"


class WindowReply(msgspec.Struct, omit_defaults=True, kw_only=True):
    messages: list[ChatMessage] = []
    tokens: int = 0
    dropped: int = 0
    summarized: int = 0  # older messages a stored summary stands in for
    existing: ChatMessage | None = None
    existing_ref: ContextRef | None = None
    error: ErrorInfo | None = None


class ContextSummarize(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Store ``content`` as the summary of the first ``covers`` messages of
    ``session``; ``summary_tail`` windows show it instead of them."""

    tenant: Id
    session: Id
    msg_id: str
    covers: int
    content: str


class ContextFork(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Create ``child`` sharing the prefix ``ref`` covers, without copying it.
    Idempotent: forking the same ref into the same child again is a no-op.
    ``upto``: share only the first ``upto`` messages of that prefix (a run
    forked from its first step leaves the task's input out, to replace it)."""

    tenant: Id
    ref: ContextRef
    child: Id
    upto: int | None = None


class ForkReply(msgspec.Struct, omit_defaults=True, kw_only=True):
    ref: ContextRef | None = None
    duplicate: bool = False
    error: ErrorInfo | None = None


class ContextGet(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Read a session (parent prefix included), a page at a time, or one
    attachment when ``attachment`` names it."""

    tenant: Id
    session: Id
    start: int = 0
    limit: int = 256
    attachment: Id | None = None


class GetReply(msgspec.Struct, omit_defaults=True, kw_only=True):
    messages: list[ChatMessage] = []
    length: int = 0
    ref: ContextRef | None = None
    fork: ForkOrigin | None = None
    summary: Summary | None = None
    attachments: list[str] = []
    data: bytes | None = None
    error: ErrorInfo | None = None


class ContextAttach(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Store an attachment of a session. Attachments are immutable: a second
    one under the same name is refused with ``conflict``."""

    tenant: Id
    session: Id
    name: Id
    data: bytes
    media_type: str = "application/octet-stream"


class AttachReply(msgspec.Struct, omit_defaults=True, kw_only=True):
    size: int = 0
    error: ErrorInfo | None = None


class ContextDelete(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Erase a session with its forks and attachments, or (``session`` unset)
    every session of the tenant."""

    tenant: Id
    session: Id | None = None


class DeleteReply(msgspec.Struct, omit_defaults=True, kw_only=True):
    sessions: int = 0
    records: int = 0
    attachments: int = 0
    documents: int = 0  # search documents (tenant erasure only)
    error: ErrorInfo | None = None


class ContextStats(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Counts for one session, or for the whole tenant when ``session`` is unset."""

    tenant: Id
    session: Id | None = None


class StatsReply(msgspec.Struct, omit_defaults=True, kw_only=True):
    sessions: int = 0
    records: int = 0
    messages: int = 0
    tokens: int = 0
    attachments: int = 0
    last_activity: float = 0.0
    error: ErrorInfo | None = None


class ContextInvalidate(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Core NATS ``baton.ctxinval.<tenant>``: every store replica drops its
    cache of the session (or of the whole tenant when ``session`` is unset)."""

    tenant: str
    session: str | None = None


# --------------------------------------------------------------------------
# Internal: inference
# --------------------------------------------------------------------------


class InferenceJob(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Body of ``baton.jobs.<pool>``: a pointer and limits, never the history."""

    job_id: str
    task_id: Id
    tenant: Id
    session: Id
    workflow: str
    step: str
    agent: str
    ref: ContextRef
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    system: str | None = None  # the agent's system prompt (replaces the session's)
    response_schema: str | None = None  # JSON schema the answer must follow, if any
    context_budget: int = 0  # tokens for the window; 0 = worker decides
    tools: list[ToolSpec] = []  # offered to the model (OpenAI tools format on the wire)
    tool_choice: str = "auto"  # "auto" | "required" | "none"
    attempt: int = 1  # dispatch of this job (a step timeout dispatches again); names the result
    published_at: float = 0.0
    # A pre-warm (services/orchestrator/prewarm.py): prefill ``system`` + the
    # window of ``ref`` for ``step``, which has not started yet, so that its
    # prefix is in this worker's cache when it does. One token is generated
    # and thrown away: no answer is appended; the result published says only
    # the GPU time it took (``InferenceResult.warm``), charged to the run.
    warm: bool = False


class InferenceResult(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Body of ``baton.results.<tenant>.<task_id>``. ``output`` is one
    completion (bounded by ``max_tokens``), not the history."""

    job_id: str
    task_id: str
    tenant: str
    session: str
    step: str
    worker: str
    ref: ContextRef | None = None
    output: str = ""
    tool_calls: list[ToolCall] = []  # the model asked for these (its answer is not final)
    usage: Usage = msgspec.field(default_factory=Usage)
    cached_tokens: int = 0
    queue_seconds: float = 0.0
    timing: Timing | None = None  # the job's waterfall (no ``record`` transit yet)
    error: ErrorInfo | None = None
    # A pre-warm's charge: no answer, only ``usage.gpu_seconds`` its prefill
    # took on a worker of ``pool``, added to the run's usage and cost once.
    warm: bool = False
    pool: str = ""


class Heartbeat(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Core NATS ``baton.workers.heartbeat.<pool>.<worker>``, every few seconds."""

    worker: str
    pool: str
    ready: bool
    engine: str
    inflight: int = 0
    admitted_tokens: int = 0
    kv_capacity_tokens: int = 0
    warm_sessions: list[str] = []
    leaving: bool = False  # the last heartbeat of a worker that shuts down cleanly
    ts: float = 0.0
    # Measured by the worker, not configured (0: not known yet): the engine's
    # KV cache in tokens, sequence slots and context length (from its cache
    # config), and per-sequence prefill and decode speeds (tokens/s) over its
    # recent generations. ``engine`` "sim" says they are a simulator's.
    kv_tokens: int = 0
    max_seqs: int = 0
    max_model_len: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0


class ReplicaLoad(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Core NATS ``baton.orchestrators.load.<replica>``, every
    ``BATON_REPLICA_LOAD_EVERY`` seconds (``every``): the tokens one
    orchestrator replica's runs hold on the pools now (the fair gate's
    ``held``, all tenants), so the other replicas lend idle shares only out
    of what is left of the pools. A replica not heard from for three of its
    intervals holds nothing."""

    replica: str
    held_tokens: int = 0
    every: float = 1.0
    at: float = 0.0


class RunTimer(msgspec.Struct, kw_only=True):
    """Body of ``baton.timers.<tenant>.<task_id>``: a run's durable watchdog,
    one per run (not per step). Naked until ``due``; when it fires, the
    orchestrator looks at the run's step deadlines (kept in the run state),
    retries or fails the overdue ones, and naks it again until the next one."""

    tenant: str
    task_id: str
    due: float


class Cancel(msgspec.Struct, kw_only=True):
    """Core NATS ``baton.cancel.<tenant>.<task_id>``: stop the task's generations."""

    tenant: str
    task_id: str
    reason: str = "cancelled"


# --------------------------------------------------------------------------
# Internal: erasure and the audit trail
# --------------------------------------------------------------------------


class SessionsErased(msgspec.Struct, omit_defaults=True, kw_only=True):
    """JetStream ``baton.erased.<tenant>``: the context store erased these
    sessions (forks included), or every session of the tenant when
    ``whole_tenant``; the orchestrator then erases the tasks that ran on them
    (their events, run entries, pending results, dead letters)."""

    tenant: Id
    sessions: list[str] = []
    whole_tenant: bool = False
    actor: str = ""
    at: float = 0.0


class AuditRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Body of ``baton.audit.<action>.<tenant>`` (stream ``BATON_AUDIT``): who
    did what to which target, when, and how it ended. Never carries user text.

    ``actor``: ``operator``, ``tenant:<id>``, ``anonymous`` (an open dev API),
    ``bus`` (a NATS request), ``retention``, or a service (``service:<name>``).
    ``action``: e.g. ``erase_session``, ``erase_tenant``, ``erase_tasks``,
    ``permission_violation``. ``target``: ``<tenant>/<session>``, ``<tenant>``,
    a subject... ``outcome``: ``ok``, ``refused``, ``failed``. ``detail``:
    counts and ids, never content."""

    actor: str
    action: str
    target: str
    outcome: str
    at: float
    tenant: str = ""
    service: str = ""
    detail: dict[str, Any] = {}


# --------------------------------------------------------------------------
# Internal: tools
# --------------------------------------------------------------------------


class ToolCatalog(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Bucket ``baton-tools`` entry ``<pool>``: the tools a tool pool serves, as
    its workers last wrote them (the orchestrator offers these to models)."""

    pool: str
    tools: list[ToolSpec] = []
    worker: str = ""
    ts: float = 0.0


class ToolJob(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Body of ``baton.tools.<pool>``: run one call and append its result to
    ``session`` as a ``tool`` message. ``call_id`` (``<tenant>.<task_id>.
    <step>.<call>``) is the Nats-Msg-Id and the idempotency key of the
    append, so a redelivered call whose result is stored is not run again.
    ``ref`` covers the session up to the assistant turn that made the call."""

    call_id: str
    task_id: Id
    tenant: Id
    session: Id
    step: str
    tool: str
    arguments: str = "{}"
    tool_call_id: str = ""  # the model's id of the call, echoed in the tool message
    ref: ContextRef | None = None
    timeout: float = 0.0  # seconds; 0 = the worker's default
    attempt: int = 1  # dispatch of this call (a step timeout dispatches again); names the result
    published_at: float = 0.0


class ToolResult(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Body of ``baton.toolresults.<tenant>.<task_id>``: a finished call.
    ``preview`` is the start of the stored tool message, never all of it; a
    result over the inline limit is an attachment of the session named
    ``attachment``. ``outcome`` is ``ok`` or the error code (also in ``error``)."""

    call_id: str
    task_id: str
    tenant: str
    session: str
    step: str
    tool: str
    worker: str
    outcome: str = "ok"
    ref: ContextRef | None = None  # the session up to (and with) the tool message
    preview: str = ""
    attachment: str | None = None
    size: int = 0  # bytes of the full result
    cpu_seconds: float = 0.0
    seconds: float = 0.0
    reused: bool = False  # the result was stored before (a redelivery): not run again
    timing: Timing | None = None  # the call's waterfall (no ``record`` transit yet)
    error: ErrorInfo | None = None


class ContextAnswer(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A worker's answer and its result, in one request
    (``baton.ctx.answer.<tenant>``), ``result`` (a model step's) or
    ``tool_result`` (a tool call's), exactly one, naming the subject's tenant
    (``context_api.answer_target``). The store appends ``answer`` to the
    result's session, idempotently: under ``keys.answer(job_id)`` (``base``
    as for ``ContextAppend``), or ``keys.tool_output(call_id)``. With a
    model step's result it publishes ``last_delta`` (the generation's final
    token delta, ``Nats-Msg-Id`` ``keys.token_delta``) on
    ``baton.tokens.<tenant>.<task_id>`` at the same time. Then it publishes
    the result, its ``ref`` the answer's, on ``baton.results.<tenant>.<task_id>``
    (``keys.result(job_id, attempt)``) or ``baton.toolresults.<tenant>.<task_id>``
    (``keys.tool_result(call_id, attempt)``) with the request's own reply
    subject: JetStream's ack of the result is the reply. A tool's output
    stored already (another run's, maybe) is not published: the reply is a
    ``ContextAppendReply`` with ``duplicate`` and its ``ref``, and the worker
    republishes what is stored. A refusal is a ``ContextAppendReply`` with
    ``error``; no reply in time means "ask again" (every part is idempotent)."""

    tenant: Id
    answer: ChatMessage
    result: InferenceResult | None = None
    tool_result: ToolResult | None = None
    base: ContextRef | None = None
    attempt: int = 1
    last_delta: TokenDelta | None = None


class DocumentPut(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Body of ``baton.docs.<tenant>.<doc_id>`` (stream ``BATON_DOCUMENTS``):
    a document the ``search`` tool indexes for its tenant. A second put under
    the same id replaces it."""

    tenant: Id
    doc_id: Id
    text: str
    title: str = ""
    metadata: dict[str, str] = {}


class DocumentsErased(msgspec.Struct, kw_only=True):
    """Core NATS ``baton.docserased.<tenant>``: every tool worker drops the
    tenant's documents from its search index (the stream copy is purged)."""

    tenant: str
