"""Dead letters: a watch on JetStream's max-delivery advisories (a message whose
every delivery crashed or stalled its handler is copied into ``BATON_DLQ``
under ``Bus.dead_letter``'s id scheme), and the operator's ``list`` /
``replay`` / ``purge``; ``replay`` refuses and keeps the letter of a task
that already ended. Why: docs/deploy.md, "BatonDeadLetters / BatonMaxDeliveries"."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Counter

from baton.bus import HDR_DLQ_REASON, HDR_DLQ_SUBJECT, HDR_TASK_ID, Bus, Message
from baton.metrics import register
from proto import codec, keys, subjects
from proto.ids import is_valid_id
from proto.streams import DEAD_LETTERS, EVENTS

log = structlog.get_logger("baton.dlq")

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
QUEUE = "baton-dlq-watch"  # one replica handles each advisory

MAX_DELIVERIES = Counter(
    "baton_max_deliveries",
    "Messages JetStream stopped delivering after max_deliver attempts, by stream and consumer.",
    ["stream", "consumer"],
    registry=None,  # exported by the process that watches (register)
)


@dataclass(frozen=True, slots=True)
class Advisory:
    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


def parse_advisory(data: bytes) -> Advisory | None:
    """The max-delivery advisory's fields, or None when it is not one (pure)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    stream, consumer, seq = doc.get("stream"), doc.get("consumer"), doc.get("stream_seq")
    deliveries = doc.get("deliveries", 0)
    if not (isinstance(stream, str) and isinstance(consumer, str) and isinstance(seq, int)):
        return None
    if not isinstance(deliveries, int) or seq <= 0:
        return None
    return Advisory(stream, consumer, seq, deliveries)


class MaxDeliveryWatch:
    """Subscribe once per process; every replica may run one (queue group)."""

    def __init__(self, bus: Bus, known: Sequence[tuple[str, str]] = ()) -> None:
        self.bus = bus
        register(MAX_DELIVERIES)
        for stream, consumer in known:  # series exist from the start
            MAX_DELIVERIES.labels(stream, consumer)

    async def start(self) -> None:
        await self.bus.subscribe_raw(f"{ADVISORY}.>", self.on_advisory, queue=QUEUE)

    async def on_advisory(self, msg: Message) -> None:
        adv = parse_advisory(msg.data)
        if adv is None:
            return
        MAX_DELIVERIES.labels(adv.stream, adv.consumer).inc()
        log.warning("max_deliveries", stream=adv.stream, consumer=adv.consumer,
                    seq=adv.stream_seq, deliveries=adv.deliveries)  # fmt: skip
        if adv.stream == DEAD_LETTERS.name or not is_valid_id(adv.consumer):
            return
        try:
            raw = await self.bus.get_msg(adv.stream, adv.stream_seq)
        except Exception as exc:  # unreadable: counted only
            log.info("max_deliveries_message_gone", error=repr(exc))
            return
        if raw is None:  # gone already (acked late, purged): counted only
            log.info("max_deliveries_message_gone", error="not found")
            return
        headers = dict(raw.headers or {})
        reason = f"max deliveries ({adv.deliveries}) reached on {adv.stream}/{adv.consumer}"
        await self.bus.publish(
            subjects.dead_letter(adv.consumer),
            raw.data or b"",
            msg_id=keys.dead_letter(adv.consumer, adv.stream_seq),
            task_id=headers.get(HDR_TASK_ID),
            headers={HDR_DLQ_REASON: reason, HDR_DLQ_SUBJECT: raw.subject or ""},
        )


# -- operators -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    consumer: str
    subject: str  # where it was consumed from
    reason: str
    task_id: str | None
    size: int
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "consumer": self.consumer, "subject": self.subject,
                "reason": self.reason, "task_id": self.task_id, "size": self.size,
                "at": self.at}  # fmt: skip


def _filter(consumer: str | None) -> str:
    return subjects.dead_letter(consumer) if consumer else f"{subjects.DEAD_LETTERS}.>"


def _entry(msg: Message) -> DeadLetter:
    h = msg.headers or {}
    return DeadLetter(
        seq=msg.seq,
        consumer=msg.subject.removeprefix(f"{subjects.DEAD_LETTERS}."),
        subject=h.get(HDR_DLQ_SUBJECT, ""),
        reason=h.get(HDR_DLQ_REASON, ""),
        task_id=h.get(HDR_TASK_ID),
        size=len(msg.data or b""),
        at=msg.time or 0.0,
    )


async def list_letters(
    bus: Bus, *, consumer: str | None = None, limit: int = 1000
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters, oldest first."""
    out: list[DeadLetter] = []
    async for msg in bus.read_subject(DEAD_LETTERS.name, _filter(consumer)):
        out.append(_entry(msg))
        if len(out) >= limit:
            break
    return out


REFUSED = "refused"
"""How ``replay``'s outcome for a letter it kept begins."""


def task_tenant(subject: str) -> str | None:
    """The tenant of a tenant's task message subject
    (``baton.tasks.<tenant>.<workflow>``), or None (pure)."""
    parts = subject.split(".")
    if len(parts) == 4 and f"{parts[0]}.{parts[1]}" == subjects.TASKS and is_valid_id(parts[2]):
        return parts[2]
    return None


def ended(event: Any) -> str | None:
    """``"failed (code)"`` or ``"completed"`` for a decoded terminal task
    event, else None (pure)."""
    if not isinstance(event, dict) or event.get("type") not in ("completed", "failed"):
        return None
    error = event.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return f"failed ({code})" if event["type"] == "failed" and code else str(event["type"])


async def _task_ended(bus: Bus, tenant: str, task_id: str) -> str | None:
    """How the task ended, from its newest event in BATON_EVENTS (None: no
    terminal event, or none kept)."""
    if not is_valid_id(task_id):
        return None
    last = await bus.last_msg(EVENTS.name, subjects.event(tenant, task_id))
    if last is None or not last.data:
        return None
    try:
        return ended(codec.decode_any(last.data))
    except Exception:  # not an event we can read: let the orchestrator judge it
        return None


async def replay(bus: Bus, seqs: Sequence[int]) -> list[tuple[int, str]]:
    """Publish each dead letter back on the subject it was consumed from, then
    delete it from the DLQ. A new message id (``dlq-replay:<seq>``): the
    original id may still be in the stream's duplicate window. Returns
    (seq, outcome) per letter; a letter without an original subject stays,
    and so does a tenant's task that has already ended (``refused: ...``)."""
    done: list[tuple[int, str]] = []
    for seq in seqs:
        raw = await bus.get_msg(DEAD_LETTERS.name, seq)
        if raw is None:
            done.append((seq, "not found"))
            continue
        headers = dict(raw.headers or {})
        target = headers.get(HDR_DLQ_SUBJECT)
        if not target:
            done.append((seq, "no original subject: kept"))
            continue
        tenant, task_id = task_tenant(target), headers.get(HDR_TASK_ID)
        how = await _task_ended(bus, tenant, task_id) if tenant and task_id else None
        if how is not None:
            done.append((seq, f"{REFUSED}: task {task_id} of {tenant} already ended {how} and"
                              " its tenant was told; kept — submit it again with a new task_id"
                              " (or purge the letter)"))  # fmt: skip
            continue
        await bus.publish(target, raw.data or b"", msg_id=keys.dead_letter_replay(seq),
                          task_id=headers.get(HDR_TASK_ID))  # fmt: skip
        await bus.erase_messages(DEAD_LETTERS.name, [seq])
        done.append((seq, f"replayed to {target}"))
    return done


async def purge(bus: Bus, *, consumer: str | None = None) -> int:
    """Delete every dead letter (of ``consumer``); returns how many."""
    before = (await bus.stream_info(DEAD_LETTERS.name)).messages
    await bus.purge(DEAD_LETTERS.name, subject=_filter(consumer))
    after = (await bus.stream_info(DEAD_LETTERS.name)).messages
    return int(before - after)


def age(letter: DeadLetter, now: float | None = None) -> float:
    return max(0.0, (now or time.time()) - letter.at)
