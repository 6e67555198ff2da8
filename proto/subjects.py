"""Subject builders. Every subject Baton uses is built here."""

from __future__ import annotations

from typing import Final

from proto.ids import require_id

TASKS: Final = "baton.tasks"
EVENTS: Final = "baton.events"
TOKENS: Final = "baton.tokens"
JOBS: Final = "baton.jobs"
RESULTS: Final = "baton.results"
CONTEXT_API: Final = "baton.ctx"
CONTEXT_LOG: Final = "baton.ctxlog"
CONTEXT_ATTACHMENTS: Final = "baton.ctxatt"
# A region's own context streams live under ``baton.region.<region>.``
# (``regional``): never under the shared streams' prefixes, which JetStream
# would refuse as overlapping subjects.
REGION: Final = "baton.region"
CONTEXT_INVALIDATE: Final = "baton.ctxinval"
HEARTBEATS: Final = "baton.workers.heartbeat"
ORCHESTRATOR_LOAD: Final = "baton.orchestrators.load"
CANCEL: Final = "baton.cancel"
DEAD_LETTERS: Final = "baton.dlq"
TIMERS: Final = "baton.timers"
ERASED: Final = "baton.erased"
AUDIT: Final = "baton.audit"
TOOLS: Final = "baton.tools"
TOOL_RESULTS: Final = "baton.toolresults"
DOCUMENTS: Final = "baton.docs"
DOCUMENTS_ERASED: Final = "baton.docserased"
INPUT: Final = "baton.input"

CONTEXT_OPS: Final = (
    "append", "answer", "window", "get", "fork", "delete", "stats", "summarize", "attach",
)  # fmt: skip


def task(workflow: str) -> str:
    """``baton.tasks.<workflow>`` — public: submit a task (in the tenant's
    own account; the server maps it to ``tenant_task``)."""
    return f"{TASKS}.{require_id(workflow, 'workflow')}"


def tenant_task(tenant: str, workflow: str) -> str:
    """``baton.tasks.<tenant>.<workflow>`` — a task as it arrives in Baton's
    account: the tenant token is set by the server from the publisher's
    credentials, never by the body."""
    return f"{TASKS}.{require_id(tenant, 'tenant')}.{require_id(workflow, 'workflow')}"


def input_answer(task_id: str) -> str:
    """``baton.input.<task_id>`` — public: a human's answer to a task's
    ``input`` step (in the tenant's own account; the server maps it to
    ``tenant_input``)."""
    return f"{INPUT}.{require_id(task_id, 'task_id')}"


def tenant_input(tenant: str, task_id: str) -> str:
    """``baton.input.<tenant>.<task_id>`` — an answer as it arrives in Baton's
    account: the tenant token is set by the server from the publisher's
    credentials, so a tenant can only answer its own tasks."""
    return f"{INPUT}.{require_id(tenant, 'tenant')}.{require_id(task_id, 'task_id')}"


def input_origin(subject: str) -> tuple[str, str]:
    """``(tenant, task_id)`` of ``baton.input.<tenant>.<task_id>`` (unchecked)."""
    tenant, _, task_id = subject[len(INPUT) + 1 :].partition(".")
    return tenant, task_id


def event(tenant: str, task_id: str) -> str:
    """``baton.events.<tenant>.<task_id>`` — public: a task's events."""
    return f"{EVENTS}.{require_id(tenant, 'tenant')}.{require_id(task_id, 'task_id')}"


def tokens(tenant: str, task_id: str) -> str:
    """``baton.tokens.<tenant>.<task_id>`` — public: a task's token deltas."""
    return f"{TOKENS}.{require_id(tenant, 'tenant')}.{require_id(task_id, 'task_id')}"


def job(pool: str) -> str:
    """``baton.jobs.<pool>`` — inference jobs for a model pool."""
    return f"{JOBS}.{require_id(pool, 'pool')}"


def worker_job(pool: str, worker: str) -> str:
    """``baton.jobs.<pool>.<worker>`` — a job routed to the worker whose
    prefix cache holds its session (cache-aware routing)."""
    return f"{job(pool)}.{require_id(worker, 'worker')}"


def result(tenant: str, task_id: str) -> str:
    """``baton.results.<tenant>.<task_id>`` — a finished inference job."""
    return f"{RESULTS}.{require_id(tenant, 'tenant')}.{require_id(task_id, 'task_id')}"


def context_api(op: str, tenant: str) -> str:
    """``baton.ctx.<op>.<tenant>`` — request-reply to the context store."""
    if op not in CONTEXT_OPS:
        raise ValueError(f"unknown context op {op!r}")
    return f"{CONTEXT_API}.{op}.{require_id(tenant, 'tenant')}"


def context_log(tenant: str, session: str) -> str:
    """``baton.ctxlog.<tenant>.<session>`` — where a session's messages are stored."""
    return f"{CONTEXT_LOG}.{require_id(tenant, 'tenant')}.{require_id(session, 'session')}"


def context_attachment(tenant: str, session: str, name: str) -> str:
    """``baton.ctxatt.<tenant>.<session>.<name>`` — one attachment of a session."""
    return (
        f"{CONTEXT_ATTACHMENTS}.{require_id(tenant, 'tenant')}."
        f"{require_id(session, 'session')}.{require_id(name, 'attachment')}"
    )


def context_log_in(region: str, tenant: str, session: str) -> str:
    """``baton.region.<region>.ctxlog.<tenant>.<session>`` — a session's
    messages when its tenant has a region (stream ``BATON_CONTEXT_IN_<region>``)."""
    rest = context_log(tenant, session).removeprefix("baton.")
    return f"{REGION}.{require_id(region, 'region')}.{rest}"


def context_attachment_in(region: str, tenant: str, session: str, name: str) -> str:
    """``baton.region.<region>.ctxatt.<tenant>.<session>.<name>`` — an attachment
    when its tenant has a region (stream ``BATON_CONTEXT_ATTACHMENTS_IN_<region>``)."""
    rest = context_attachment(tenant, session, name).removeprefix("baton.")
    return f"{REGION}.{require_id(region, 'region')}.{rest}"


def context_invalidate(tenant: str) -> str:
    """``baton.ctxinval.<tenant>`` — core NATS broadcast to every store replica."""
    return f"{CONTEXT_INVALIDATE}.{require_id(tenant, 'tenant')}"


def heartbeat(pool: str, worker: str) -> str:
    return f"{HEARTBEATS}.{require_id(pool, 'pool')}.{require_id(worker, 'worker')}"


def orchestrator_load(replica: str) -> str:
    """``baton.orchestrators.load.<replica>`` — core NATS: what one
    orchestrator replica's runs hold, for the others' lending."""
    return f"{ORCHESTRATOR_LOAD}.{require_id(replica, 'replica')}"


def cancel(tenant: str, task_id: str) -> str:
    return f"{CANCEL}.{require_id(tenant, 'tenant')}.{require_id(task_id, 'task_id')}"


def timer(tenant: str, task_id: str) -> str:
    """``baton.timers.<tenant>.<task_id>`` — a step's timeout, due later."""
    return f"{TIMERS}.{require_id(tenant, 'tenant')}.{require_id(task_id, 'task_id')}"


def erased(tenant: str) -> str:
    """``baton.erased.<tenant>`` — the context store erased sessions; the
    orchestrator erases their tasks (durable, stream ``BATON_ERASURES``)."""
    return f"{ERASED}.{require_id(tenant, 'tenant')}"


NO_TENANT: Final = "_"


def audit(action: str, tenant: str | None = None) -> str:
    """``baton.audit.<action>.<tenant>`` (``_`` when no tenant is involved) —
    one audit record (stream ``BATON_AUDIT``)."""
    return f"{AUDIT}.{require_id(action, 'action')}.{require_id(tenant or NO_TENANT, 'tenant')}"


def tool_job(pool: str) -> str:
    """``baton.tools.<pool>`` — tool calls for a tool worker pool."""
    return f"{TOOLS}.{require_id(pool, 'pool')}"


def tool_result(tenant: str, task_id: str) -> str:
    """``baton.toolresults.<tenant>.<task_id>`` — a finished tool call."""
    return f"{TOOL_RESULTS}.{require_id(tenant, 'tenant')}.{require_id(task_id, 'task_id')}"


def document(tenant: str, doc_id: str) -> str:
    """``baton.docs.<tenant>.<doc_id>`` — a document the search tool indexes
    (a tenant publishes ``baton.docs.<doc_id>`` in its own account; the server
    maps it here with the publisher's tenant)."""
    return f"{DOCUMENTS}.{require_id(tenant, 'tenant')}.{require_id(doc_id, 'doc_id')}"


def documents_erased(tenant: str) -> str:
    """``baton.docserased.<tenant>`` — core broadcast: drop the tenant's index."""
    return f"{DOCUMENTS_ERASED}.{require_id(tenant, 'tenant')}"


def dead_letter(consumer: str) -> str:
    return f"{DEAD_LETTERS}.{require_id(consumer, 'consumer')}"


def task_origin(subject: str) -> tuple[str, str]:
    """``(tenant, workflow)`` of ``baton.tasks.<tenant>.<workflow>``. The
    workflow token may be invalid (the caller checks); the tenant is the
    authenticated one (the stream only holds subjects the server mapped)."""
    tenant, _, workflow = subject[len(TASKS) + 1 :].partition(".")
    return tenant, workflow
