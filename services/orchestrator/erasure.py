"""Erasing the tasks of erased sessions: the orchestrator's half of erasure
(each step: docs/architecture.md, "Erasure of tasks"). Every step is
idempotent, so a redelivered erasure runs again harmlessly; which tasks and
which dead letters is decided purely (``tasks_to_erase``,
``dead_letter_matches``, ``tombstone``) and unit-tested."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import structlog
from nacl.exceptions import CryptoError

from baton import audit
from baton.bus import HDR_DLQ_SUBJECT, HDR_TASK_ID, Bus, Delivery, Term
from proto import codec, subjects
from proto.ids import is_valid_id
from proto.messages import Cancel, SessionsErased, Usage
from proto.streams import DEAD_LETTERS, EVENTS, RESULTS, RUNS, TIMERS, TOKENS

from .runs import RunConflict, RunStore
from .state import ERASED, RunState, run_key

log = structlog.get_logger("orchestrator.erasure")

# Streams holding a task's data on a per-task subject, besides its run.
PER_TASK_STREAMS: tuple[tuple[str, Callable[[str, str], str]], ...] = (
    (EVENTS.name, subjects.event),
    (TOKENS.name, subjects.tokens),  # the answer, delta by delta
    (RESULTS.name, subjects.result),
)

MAX_CONFLICTS = 50

# The bus of an account and a stream name: where a copy of the events lives.
EventStore = tuple[Bus, str]


# -- decisions (pure) --------------------------------------------------------


def tasks_to_erase(erasure: SessionsErased, runs: Iterable[RunState]) -> list[str]:
    """Task ids of ``runs`` that ran on an erased session (or belong to an
    erased tenant). Tombstones are included: a redelivered erasure finishes
    what an interrupted one started."""
    sessions = set(erasure.sessions)
    found: set[str] = set()
    for r in runs:
        if r.tenant != erasure.tenant:
            continue
        if (
            erasure.whole_tenant
            or r.session in sessions
            or any(st.session in sessions for st in r.steps.values())
        ):
            found.add(r.task_id)
    return sorted(found)


def tombstone(r: RunState) -> bool:
    """Strip ``r`` to a tombstone in place: ids only, status ``erased``.
    False when it already is one. ``task_seq = -1`` makes a redelivered task
    message a duplicate, never a new run."""
    if r.status == ERASED:
        return False
    r.status, r.task_seq = ERASED, -1
    r.budget, r.metadata, r.steps, r.output, r.error = None, {}, {}, "", None
    r.usage, r.cost_usd = Usage(), 0.0
    return True


def dead_letter_matches(
    headers: dict[str, str], body: bytes, tenant: str, task_ids: set[str]
) -> bool:
    """True when a dead letter carries one of ``tenant``'s ``task_ids``. Task
    ids are per tenant, so the tenant must match too: the original subject's
    tenant token (results, timers, events) or the body's ``tenant`` field."""
    if headers.get(HDR_TASK_ID) not in task_ids:
        return False
    original = headers.get(HDR_DLQ_SUBJECT, "").split(".")
    if len(original) >= 4 and original[1] in ("results", "timers", "events"):
        return original[2] == tenant
    try:
        raw = codec.decode_any(body)
    except (msgspec.DecodeError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("tenant") == tenant


# -- the eraser --------------------------------------------------------------


class TaskEraser:
    """Consumes ``baton.erased.<tenant>`` and erases the tasks it names."""

    def __init__(
        self,
        bus: Bus,
        runs: RunStore,
        *,
        grace: float = 2.0,
        event_copies: Callable[[str], Sequence[EventStore]] | None = None,
    ) -> None:
        """``event_copies(tenant)``: other stores of the tenant's events, e.g.
        ``[(bus.account(f"$JS.{tenant}.API"), "BATON_EVENTS")]``."""
        self.bus = bus
        self.runs = runs
        self.grace = grace
        self.event_copies = event_copies or (lambda _tenant: ())

    async def on_erasure(self, d: Delivery) -> None:
        req: SessionsErased = d.decode(SessionsErased)  # undecodable: dead-lettered
        if not is_valid_id(req.tenant):
            raise Term("erasure with an invalid tenant")
        structlog.contextvars.bind_contextvars(tenant=req.tenant)
        try:
            counts = await self.erase(req)
        except Exception as exc:  # the transport retries; say what the server said
            log.warning("erasure_failed", error=repr(exc))
            raise
        target = req.tenant if req.whole_tenant else f"{req.tenant}/{','.join(req.sessions)}"
        await audit.record(self.bus, audit.entry(
            req.actor or "unknown", audit.ERASE_TASKS, target, tenant=req.tenant,
            service="orchestrator", detail=counts,
        ))  # fmt: skip
        log.info("tasks_erased", **counts)

    async def erase(self, req: SessionsErased) -> dict[str, int]:
        """Erase every task of ``req``; returns counts by kind."""
        runs = await self.runs_of(req.tenant)
        task_ids = tasks_to_erase(req, runs)
        counts: collections.Counter[str] = collections.Counter(tasks=len(task_ids))
        running: list[str] = []
        for task_id in task_ids:
            was_running = await self._tombstone(req.tenant, task_id, counts)
            await self._erase_data(req.tenant, task_id, counts)
            if was_running:
                running.append(task_id)
                cancel = Cancel(tenant=req.tenant, task_id=task_id, reason="erased")
                await self.bus.notify(subjects.cancel(req.tenant, task_id), cancel)
        counts["dead_letters"] = await self._erase_dead_letters(req.tenant, set(task_ids))
        if running:
            # A handler that read the run just before the tombstone may still
            # publish one event: erase once more once it has had the time to.
            await asyncio.sleep(self.grace)
            for task_id in running:
                await self._erase_data(req.tenant, task_id, collections.Counter())
        counts["running"] = len(running)
        return dict(counts)

    async def runs_of(self, tenant: str) -> list[RunState]:
        """Every run entry of ``tenant`` (the newest revision of each key)."""
        latest: dict[str, RunState] = {}
        pattern = RUNS.subject(f"{tenant}.*")
        async for msg in self.bus.read_subject(RUNS.stream, pattern):
            if not msg.data:  # a bucket's delete or purge marker
                continue
            try:
                key = msg.subject.removeprefix(RUNS.subject(""))
                run = codec.decode(await self.runs.plain(key, msg.data), RunState)
            except (msgspec.DecodeError, CryptoError):
                continue
            latest[run.task_id] = run
        return list(latest.values())

    async def _tombstone(self, tenant: str, task_id: str, counts: collections.Counter[str]) -> bool:
        """Tombstone the run, destroy its key and erase its older revisions;
        True if it was running."""
        was_running = False
        for _ in range(MAX_CONFLICTS):
            snap = await self.runs.read(tenant, task_id)
            if snap is None:  # no run (a key alone: its creation died half-way)
                counts["run_keys"] += await self.runs.keys.destroy(run_key(tenant, task_id))
                return False
            run = snap.run()
            was_running = not run.terminal
            if tombstone(run):
                try:
                    snap = await self.runs.write(run, snap.revision)
                except RunConflict:
                    continue  # advanced meanwhile: strip the newer state
            counts["run_revisions"] += await self.runs.bucket.erase_history(
                run_key(tenant, task_id), keep_after=snap.revision
            )
            # The revisions the run's updates replaced are ciphertext under this key.
            counts["run_keys"] += await self.runs.keys.destroy(run_key(tenant, task_id))
            return was_running
        raise RunConflict(run_key(tenant, task_id))

    async def _erase_data(
        self, tenant: str, task_id: str, counts: collections.Counter[str]
    ) -> None:
        for stream, subject in PER_TASK_STREAMS:
            counts[stream] += await self.bus.erase_subject(stream, subject(tenant, task_id))
        per_task = dict(PER_TASK_STREAMS)
        for account, stream in self.event_copies(tenant):  # the copy keeps the subjects
            counts[f"{stream}@{tenant}"] += await account.erase_subject(
                stream, per_task.get(stream, subjects.event)(tenant, task_id)
            )
        await self.bus.purge(TIMERS.name, subject=subjects.timer(tenant, task_id))

    async def _erase_dead_letters(self, tenant: str, task_ids: set[str]) -> int:
        if not task_ids:
            return 0
        seqs: list[int] = []
        async for msg in self.bus.read_subject(DEAD_LETTERS.name, f"{subjects.DEAD_LETTERS}.>"):
            headers: dict[str, Any] = msg.headers or {}
            if dead_letter_matches(headers, msg.data, tenant, task_ids):
                seqs.append(msg.seq)
        return await self.bus.erase_messages(DEAD_LETTERS.name, seqs)
