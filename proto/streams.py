"""Stream, consumer and bucket definitions (pure data; the transport
turns them into JetStream configuration)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from proto import subjects
from proto.ids import require_id

Retention = Literal["workqueue", "limits"]

DAY: Final = 86_400.0


@dataclass(frozen=True, slots=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    retention: Retention
    duplicate_window: float  # seconds
    max_age: float = 0.0  # seconds, 0 = forever
    max_msg_size: int = 1024 * 1024
    description: str = ""
    deny_delete: bool = False  # an append-only record (the audit trail)
    # JetStream placement: only servers carrying every one of these
    # ``server_tags`` may hold a replica (a tenant's region, ``placed``).
    placement_tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str
    ack_wait: float  # seconds
    max_deliver: int
    max_ack_pending: int = 1000
    description: str = ""
    # Overwrite each message in the store once handled (acked or terminated):
    # a work queue's ack only unlinks it, and its bytes stay in the block file.
    erase_handled: bool = False


@dataclass(frozen=True, slots=True)
class BucketSpec:
    name: str
    history: int = 1
    ttl: float = 0.0
    description: str = ""
    # Entries can be erased from the raw store: deletes allowed on the bucket's
    # stream, and the history kept long enough that no revision is ever
    # dropped by the history limit (which unlinks without overwriting).
    erasable: bool = False

    @property
    def stream(self) -> str:
        return f"KV_{self.name}"

    def subject(self, key: str = ">") -> str:
        """The subject ``key`` is stored on (a pattern of keys, or by default
        every key)."""
        return f"$KV.{self.name}.{key}"


def _stream(
    name: str, prefix: str, retention: Retention, window: float, description: str, **more: Any
) -> StreamSpec:
    """A stream of every subject under ``prefix`` (``window``: its dedupe window)."""
    return StreamSpec(name, (f"{prefix}.>",), retention, window, description=description, **more)


TASKS_PREFIX: Final = "BATON_TASKS_"


def tenant_tasks(tenant: str) -> StreamSpec:
    """One task stream per tenant, so ``Nats-Msg-Id`` de-duplicates within a
    tenant only: a tenant reusing another's task id neither drops that task
    nor learns that the id exists (JetStream de-duplicates stream-wide)."""
    return StreamSpec(
        name=f"{TASKS_PREFIX}{require_id(tenant, 'tenant')}",
        # The tenant's answers to its tasks' input steps live here too: what a
        # tenant publishes is de-duplicated among its own messages only.
        subjects=(f"{subjects.TASKS}.{tenant}.*", f"{subjects.INPUT}.{tenant}.*"),
        retention="workqueue",
        duplicate_window=120.0,
        description=f"Tasks and input answers submitted by tenant {tenant}. "
        "Nats-Msg-Id = task_id de-duplicates.",
    )


REGION_TAG: Final = "region:"


def region_tags(region: str | None) -> tuple[str, ...]:
    """The server tags a stream of ``region``'s data is placed on
    (``region:eu``); none for a tenant without a region."""
    return (f"{REGION_TAG}{require_id(region, 'region')}",) if region else ()


def placed(spec: StreamSpec, region: str | None) -> StreamSpec:
    """``spec`` pinned to ``region``'s servers (unchanged without a region)."""
    return replace(spec, placement_tags=region_tags(region)) if region else spec


TASK_MAX_DELIVER: Final = 10


def task_consumer(tenant: str) -> ConsumerSpec:
    """The consumer every orchestrator replica shares on a tenant's tasks."""
    stream = tenant_tasks(tenant)
    return ConsumerSpec(
        stream=stream.name,
        durable="orchestrator-tasks",
        filter_subject=stream.subjects[0],
        # Short, like the results': a task held by a replica that died, or
        # whose ack was lost in a NATS restart, comes back this soon (a live
        # handler extends it with in_progress every ack_wait / 3).
        ack_wait=10.0,
        # Intake needs the run store: a bucket's leader election (15-20 s seen in the
        # chaos tier) must not use up the deliveries. The back-off (0.5 s
        # doubling, at most 30 s) over 10 deliveries waits ~2 min; a poison
        # task is terminated on its first delivery whatever this says.
        max_deliver=TASK_MAX_DELIVER,
        description="Shared by every orchestrator replica.",
        erase_handled=True,  # a task's input and metadata
    )


def input_consumer(tenant: str) -> ConsumerSpec:
    """The consumer every orchestrator replica shares on a tenant's answers
    to its tasks' ``input`` steps (on the tenant's task stream)."""
    stream = tenant_tasks(tenant)
    return ConsumerSpec(
        stream=stream.name,
        durable="orchestrator-inputs",
        filter_subject=stream.subjects[1],
        ack_wait=30.0,
        max_deliver=TASK_MAX_DELIVER,  # resuming needs the run store, as intake does
        description="Shared by every orchestrator replica.",
        erase_handled=True,  # a human's answer is the tenant's content
    )


# The shared streams, one a row: name, subjects under, retention, dedupe window (s).
# fmt: off
JOBS = _stream("BATON_JOBS", subjects.JOBS, "workqueue", 600.0,
               "Inference jobs per model pool; Nats-Msg-Id = step id.")
RESULTS = _stream("BATON_RESULTS", subjects.RESULTS, "workqueue", 600.0,
                  "Finished inference jobs, consumed by orchestrators.")
EVENTS = _stream("BATON_EVENTS", subjects.EVENTS, "limits", 120.0,
                 "Task events (public, replayable).", max_age=7 * DAY)
# Deltas serve live and reconnecting readers; the answer itself is kept
# by the context store, so a day of replay is plenty.
TOKENS = _stream("BATON_TOKENS", subjects.TOKENS, "limits", 120.0,
                 "Token deltas per task (public, replayable from a sequence).", max_age=1 * DAY)
CONTEXT = _stream("BATON_CONTEXT", subjects.CONTEXT_LOG, "limits", 600.0,
                  "Every session's messages, one subject per session.", max_msg_size=512 * 1024)
CONTEXT_ATTACHMENTS = _stream(
    "BATON_CONTEXT_ATTACHMENTS", subjects.CONTEXT_ATTACHMENTS, "limits", 60.0,
    "Session attachments, one subject (one immutable message) each.", max_msg_size=1024 * 1024)
DEAD_LETTERS = _stream("BATON_DLQ", subjects.DEAD_LETTERS, "limits", 120.0,
                       "Messages terminated after their last delivery, kept for inspection.",
                       max_age=14 * DAY)
TIMERS = _stream("BATON_TIMERS", subjects.TIMERS, "workqueue", 600.0,
                 "Durable step timers: naked with a delay until due.")
ERASURES = _stream("BATON_ERASURES", subjects.ERASED, "workqueue", 60.0,
                   "Sessions the context store erased, for the orchestrator to erase their tasks.")
AUDIT = _stream("BATON_AUDIT", subjects.AUDIT, "limits", 60.0,
                "The audit trail: erasures, tenant deletions, permission violations.",
                max_age=400 * DAY, deny_delete=True)
TOOLS = _stream("BATON_TOOLS", subjects.TOOLS, "workqueue", 600.0,
                "Tool calls per tool pool; Nats-Msg-Id = <tenant>.<task_id>.<step>.<call>.")
TOOL_RESULTS = _stream("BATON_TOOL_RESULTS", subjects.TOOL_RESULTS, "workqueue", 600.0,
                       "Finished tool calls, consumed by orchestrators.")
# JetStream de-duplicates Nats-Msg-Id stream-wide, and a tenant's own header
# reaches this shared stream unchanged: one tenant's id could drop another's
# document. A put is idempotent per (tenant, doc_id) anyway (it replaces), so
# the window is the server's minimum (100 ms).
DOCUMENTS = _stream("BATON_DOCUMENTS", subjects.DOCUMENTS, "limits", 0.1,
                    "Documents per tenant for the search tool (a later put of an id replaces it).",
                    max_msg_size=512 * 1024)
# fmt: on


@dataclass(frozen=True, slots=True)
class ContextHome:
    """Where the context store keeps the histories and attachments of a
    region's tenants: the shared pair (region ``""``), or the region's own
    pair placed on its servers. ``context_home(region)`` is the one map from
    a tenant's region to streams and subjects: every reader, writer, window,
    fork, sweep and erasure goes through it."""

    region: str
    log: StreamSpec
    attachments: StreamSpec

    @property
    def log_root(self) -> str:
        """``baton.ctxlog`` or ``baton.region.<r>.ctxlog``."""
        return self.log.subjects[0].removesuffix(".>")

    @property
    def attachment_root(self) -> str:
        return self.attachments.subjects[0].removesuffix(".>")

    def log_subject(self, tenant: str, session: str) -> str:
        """``<log_root>.<tenant>.<session>`` — where a session's records are stored."""
        if self.region:
            return subjects.context_log_in(self.region, tenant, session)
        return subjects.context_log(tenant, session)

    def log_pattern(self, tenant: str = "*") -> str:
        """Every session log of ``tenant`` (of every tenant by default)."""
        return f"{self.log_root}.{tenant}.*"

    def log_origin(self, subject: str) -> tuple[str, str]:
        """``(tenant, session)`` of a subject ``log_pattern`` matched."""
        tenant, _, session = subject[len(self.log_root) + 1 :].partition(".")
        return tenant, session

    def attachment_subject(self, tenant: str, session: str, name: str) -> str:
        """``<attachment_root>.<tenant>.<session>.<name>`` — one attachment."""
        if self.region:
            return subjects.context_attachment_in(self.region, tenant, session, name)
        return subjects.context_attachment(tenant, session, name)

    def attachment_pattern(self, tenant: str, session: str | None = None) -> str:
        """Every attachment of a session (of every session of ``tenant`` by default)."""
        return f"{self.attachment_root}.{tenant}.{session or '*'}.*"


def regional_root(region: str, root: str) -> str:
    """``root`` (``baton.ctxlog``) as a region's own (``baton.region.<region>.ctxlog``);
    ``region`` may be the wildcard ``*`` (a permission over every region)."""
    return f"{subjects.REGION}.{region}.{root.removeprefix('baton.')}"


CONTEXT_IN: Final = "BATON_CONTEXT_IN_"
CONTEXT_ATTACHMENTS_IN: Final = "BATON_CONTEXT_ATTACHMENTS_IN_"
SHARED_CONTEXT: Final = ContextHome("", CONTEXT, CONTEXT_ATTACHMENTS)


def context_home(region: str | None) -> ContextHome:
    """The context streams of a tenant of ``region``: without a region the
    shared ``BATON_CONTEXT`` pair, else ``BATON_CONTEXT_IN_<region>`` and
    ``BATON_CONTEXT_ATTACHMENTS_IN_<region>``, on ``baton.region.<region>.``
    subjects and placed on the region's servers. One pair per region, not
    per tenant: each stream is a Raft group, and there are few regions and
    many tenants."""
    if not region:
        return SHARED_CONTEXT
    r = require_id(region, "region")
    log = replace(CONTEXT, name=f"{CONTEXT_IN}{r}", placement_tags=region_tags(r),
                  subjects=(f"{regional_root(r, subjects.CONTEXT_LOG)}.>",),
                  description=f"The session messages of region {r}'s tenants, one subject "
                  "per session.")  # fmt: skip
    attachments = replace(
        CONTEXT_ATTACHMENTS,
        name=f"{CONTEXT_ATTACHMENTS_IN}{r}",
        placement_tags=region_tags(r),
        subjects=(f"{regional_root(r, subjects.CONTEXT_ATTACHMENTS)}.>",),
        description=f"The session attachments of region {r}'s tenants.",
    )
    return ContextHome(r, log, attachments)


ALL_STREAMS: Final = (
    JOBS, RESULTS, EVENTS, TOKENS, CONTEXT, CONTEXT_ATTACHMENTS, DEAD_LETTERS, TIMERS,
    ERASURES, AUDIT,
    TOOLS, TOOL_RESULTS, DOCUMENTS,
)  # fmt: skip
"""Baton's shared streams (the per-tenant task streams come from ``tenant_tasks``)."""

ORCHESTRATOR_STREAMS: Final = tuple(
    s for s in ALL_STREAMS if s not in (CONTEXT, CONTEXT_ATTACHMENTS)
)
"""What the orchestrator provisions: all but the history and attachments,
which only the context store may touch."""

TENANT_EVENTS = StreamSpec(
    name=EVENTS.name,
    subjects=(f"{subjects.EVENTS}.*.>",),
    retention="limits",
    duplicate_window=120.0,
    max_age=7 * DAY,
    description="This tenant's task events, imported from Baton (replayable).",
)
"""The copy of its own events each tenant account keeps (its only subjects
there are its own, so the wildcard captures exactly them)."""

TENANT_TOKENS = StreamSpec(
    name=TOKENS.name,
    subjects=(f"{subjects.TOKENS}.*.>",),
    retention="limits",
    duplicate_window=120.0,
    max_age=1 * DAY,
    description="This tenant's token deltas, imported from Baton (resumable by sequence).",
)


def tenant_streams(tenant: str, region: str | None = None) -> tuple[StreamSpec, ...]:
    """Every stream that holds only ``tenant``'s data, placed in its region:
    its task stream (in BATON's account), then its account's own copies of
    its events and tokens. (No bucket is per tenant: the run store, the
    registry and the shared streams are one for all, ``docs/security.md``.)"""
    return tuple(placed(s, region) for s in (tenant_tasks(tenant), TENANT_EVENTS, TENANT_TOKENS))


ORCHESTRATOR_DEAD_TASKS = ConsumerSpec(
    stream=DEAD_LETTERS.name,
    durable="orchestrator-dead-tasks",
    # The dead letters of the tenants' task consumer (durable orchestrator-tasks).
    filter_subject=f"{subjects.DEAD_LETTERS}.orchestrator-tasks",
    ack_wait=30.0,
    max_deliver=5,
    description="Ends each dead-lettered task with a failed event (unavailable); "
    "the copy stays in BATON_DLQ for `baton dlq replay`.",
)
ORCHESTRATOR_TIMERS = ConsumerSpec(
    stream=TIMERS.name,
    durable="orchestrator-timers",
    filter_subject=f"{subjects.TIMERS}.>",
    ack_wait=30.0,
    max_deliver=-1,  # a timer is naked until it is due: never dead-letter it
    max_ack_pending=100_000,
)
ORCHESTRATOR_RESULTS = ConsumerSpec(
    stream=RESULTS.name,
    durable="orchestrator-results",
    filter_subject=f"{subjects.RESULTS}.>",
    # Short: a result held by a replica that died is taken over this soon
    # (live handlers extend it with in_progress every ack_wait / 3).
    ack_wait=10.0,
    max_deliver=TASK_MAX_DELIVER,  # recording needs the run store, as intake does
    erase_handled=True,  # a step's output
)
ORCHESTRATOR_ERASURES = ConsumerSpec(
    stream=ERASURES.name,
    durable="orchestrator-erasures",
    filter_subject=f"{subjects.ERASED}.>",
    ack_wait=60.0,
    max_deliver=-1,  # an erasure is retried (with back-off) until it is done
)


ORCHESTRATOR_TOOL_RESULTS = ConsumerSpec(
    stream=TOOL_RESULTS.name,
    durable="orchestrator-tool-results",
    filter_subject=f"{subjects.TOOL_RESULTS}.>",
    ack_wait=30.0,
    max_deliver=TASK_MAX_DELIVER,  # recording needs the run store, as intake does
)


# How long a job may be held without a sign of life before it is redelivered.
# A consumer property, so every service that provisions the consumer must
# agree: a constant of the protocol, not a setting. Live workers extend it
# with ``in_progress`` every third of it, so it bounds only how long a dead
# worker's job waits.
JOB_ACK_WAIT: Final = 10.0


def tool_consumer(pool: str, ack_wait: float = 30.0) -> ConsumerSpec:
    """The pull consumer every tool worker of ``pool`` shares. A worker that
    dies mid-call gets the call redelivered after ``ack_wait``; live workers
    extend it with ``in_progress`` while a tool runs."""
    return ConsumerSpec(
        stream=TOOLS.name,
        durable=f"tools-{pool}",
        filter_subject=subjects.tool_job(pool),
        ack_wait=ack_wait,
        max_deliver=5,
        max_ack_pending=4096,
    )


def worker_consumer(pool: str, ack_wait: float = JOB_ACK_WAIT) -> ConsumerSpec:
    """The pull consumer every worker of ``pool`` shares. A worker that dies
    mid-job gets its job redelivered after ``ack_wait``; live workers extend
    it with ``in_progress`` every ``ack_wait / 3``."""
    return ConsumerSpec(
        stream=JOBS.name,
        durable=f"worker-{pool}",
        filter_subject=subjects.job(pool),
        ack_wait=ack_wait,
        max_deliver=5,
        max_ack_pending=4096,
    )


DIRECT_PREFIX: Final = "direct:"


def direct_consumer(pool: str, worker: str, ack_wait: float = JOB_ACK_WAIT) -> ConsumerSpec:
    """A worker's own consumer of ``baton.jobs.<pool>.<worker>``. Durable, so
    jobs routed to a worker that dies wait for a peer to rescue them; the
    description (``direct:<pool>:<worker>``) names the owner."""
    digest = hashlib.sha1(f"{pool}/{worker}".encode()).hexdigest()[:20]
    return ConsumerSpec(
        stream=JOBS.name,
        durable=f"direct-{digest}",
        filter_subject=subjects.worker_job(pool, worker),
        ack_wait=ack_wait,
        max_deliver=5,
        max_ack_pending=4096,
        description=f"{DIRECT_PREFIX}{pool}:{worker}",
    )


def direct_owner(description: str | None) -> tuple[str, str] | None:
    """(pool, worker) of a direct consumer's description, else None."""
    if not description or not description.startswith(DIRECT_PREFIX):
        return None
    pool, _, worker = description[len(DIRECT_PREFIX) :].partition(":")
    return (pool, worker) if pool and worker else None


# Each run's entries are sealed with its own key (services/orchestrator/runkeys.py,
# entry ``<tenant>.<task_id>.key``): a revision an update replaces is dropped as
# ciphertext, and erasing the task overwrites its key (erasable for that).
RUNS = BucketSpec(name="baton-runs", history=1, erasable=True,
                  description="Durable run state per task, and its key.")  # fmt: skip
TENANTS = BucketSpec(
    name="baton-tenants",
    history=1,
    description="The tenant registry: each tenant's state (active, suspended, deleted).",
)
TOOL_CATALOG = BucketSpec(
    name="baton-tools", history=1, description="The tools each tool pool serves, by pool."
)
