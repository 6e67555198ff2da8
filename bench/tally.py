"""Which messages make a step: every message on the bus sorted by kind and
by the service connection that sent or received it (issue #23).

A core subscription on ``>`` in Baton's account sees each message once as it
crosses nats-server: a service's publish (in nats-server's ``/connz`` its
``in_msgs``) and what the server hands a service (``out_msgs``): JetStream
deliveries, replies, pull statuses, core messages it subscribes to. Who
sent or receives a message is read off the subject and reply: a request's
reply subject is in its asker's inbox (``_INBOX_<service>.``), a delivery's
subject is the pull request's inbox, an ack goes to ``$JS.ACK.<stream>.
<consumer>`` (the consumer's service learnt from its deliveries). A core
broadcast (heartbeats, load beacons) counts once for its sender and once
for each service in ``BROADCASTS``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

SERVER = "nats-server"
INBOX = "_INBOX_"
# Core subjects (second token) -> their sender and the services subscribed.
BROADCASTS = {
    "workers": ("inference-worker", ("orchestrator", "inference-worker")),  # heartbeats
    "orchestrators": ("orchestrator", ("orchestrator",)),  # load beacons
    "cancel": ("orchestrator", ("inference-worker",)),
    "ctxinval": ("context-store", ("context-store",)),
}
CONSUMERS = (("orchestrator-", "orchestrator"), ("worker-", "inference-worker"),
             ("direct-", "inference-worker"), ("tools-", "tool-worker"))  # fmt: skip
ACKS = {b"": "ack", b"+ACK": "ack", b"-NAK": "nak", b"+WPI": "in_progress", b"+TER": "term",
        b"+NXT": "ack_next"}  # fmt: skip


def _owner(inbox: str) -> str:
    """``_INBOX_orchestrator.xyz`` -> ``orchestrator`` (else the bench's own)."""
    if inbox.startswith(INBOX):
        return inbox[len(INBOX) :].split(".", 1)[0]
    return "client"


def _consumer_owner(consumer: str) -> str:
    """The service pulling ``consumer``; "?" for an ephemeral one (an
    ordered replay: its name does not say whose)."""
    for prefix, service in CONSUMERS:
        if consumer.startswith(prefix):
            return service
    return "?"


def _kind(consumer: str) -> str:
    """A consumer as a kind: a worker's direct consumer by its role, not its hash."""
    if consumer.startswith("direct-"):
        return "direct-<worker>"
    return consumer if _consumer_owner(consumer) != "?" else "<ephemeral>"


def _stream(name: str) -> str:
    """A tenant's own stream by its role: ``BATON_TASKS_acme`` -> ``BATON_TASKS_<tenant>``."""
    return "BATON_TASKS_<tenant>" if name.startswith("BATON_TASKS_") else name


def _root(subject: str) -> str:
    """``baton.events.acme.t1`` -> ``baton.events``; ``$KV.baton-runs.k`` -> ``$KV.baton-runs``."""
    return ".".join(subject.split(".", 2)[:2])


@dataclass
class KindTap:
    """Counts while started: ``sent[service][kind]``, ``received[service][kind]``."""

    sent: dict[str, Counter[str]] = field(default_factory=dict)
    received: dict[str, Counter[str]] = field(default_factory=dict)
    _open: dict[str, tuple[str, str]] = field(default_factory=dict)  # reply -> (kind, answerer)
    _sub: Subscription | None = None
    started: float = 0.0

    def _count(self, sender: str, receivers: tuple[str, ...], kind: str) -> None:
        self.sent.setdefault(sender, Counter())[kind] += 1
        for r in receivers:
            self.received.setdefault(r, Counter())[kind] += 1

    def _request(self, msg: Msg, kind: str, answerer: str, reply_kind: str) -> None:
        asker = _owner(msg.reply)
        self._count(asker, (answerer,), kind)
        self._open[msg.reply] = (reply_kind, answerer)

    def see(self, msg: Msg) -> None:
        subject, reply = msg.subject, msg.reply or ""
        if subject in self._open:  # the reply to a request seen earlier
            kind, answerer = self._open.pop(subject)
            self._count(answerer, (_owner(subject),), kind)
        elif reply.startswith("$JS.ACK."):  # a JetStream delivery (shown on its own subject)
            consumer = reply.split(".")[3]
            self._count(SERVER, (_consumer_owner(consumer),), f"delivery {_kind(consumer)}")
        elif subject.startswith("$JS.ACK."):  # ack, nak, in progress, term
            consumer = subject.split(".")[3]
            what = ACKS.get(bytes(msg.data[:4]), "ack")
            self._count(_consumer_owner(consumer), (SERVER,), f"{what} {_kind(consumer)}")
            if reply:
                self._open[reply] = (f"{what} reply {consumer}", SERVER)
        elif subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            consumer = subject.rsplit(".", 1)[1]
            self._count(_owner(reply), (SERVER,), f"pull request {_kind(consumer)}")
        elif subject.startswith("$JS.API.STREAM.MSG.DELETE."):
            stream = _stream(subject.rsplit(".", 1)[1])
            self._request(msg, f"erase {stream}", SERVER, f"erase reply {stream}")
        elif subject.startswith(("$JS.API.DIRECT.GET.", "$JS.API.STREAM.MSG.GET.")):
            stream = _stream(subject.split(".")[4 if ".DIRECT." in subject else 5])
            self._request(msg, f"get {stream}", SERVER, f"get reply {stream}")
        elif subject.startswith("$JS.API."):
            api = ".".join(subject.split(".")[2:4])
            self._request(msg, f"api {api}", SERVER, f"api reply {api}")
        elif subject.startswith("$KV."):
            self._request(msg, f"kv write {_root(subject)}", SERVER, f"kv ack {_root(subject)}")
        elif subject.startswith("baton.ctx.") and reply:
            op = subject.split(".")[2]
            self._request(msg, f"ctx request {op}", "context-store", f"ctx reply {op}")
        elif subject.startswith("baton.") and reply in self._open:
            # Published by a request's answerer with the asker's inbox as its
            # reply (the context store's ``answer``): JetStream acks the asker.
            root = _root(subject)
            self._count(self._open[reply][1], (SERVER,), f"publish {root}")
            self._open[reply] = (f"publish ack {root}", SERVER)
        elif subject.startswith("baton.") and reply.startswith(INBOX):
            root = _root(subject)
            self._request(msg, f"publish {root}", SERVER, f"publish ack {root}")
        elif subject.startswith(INBOX):  # nothing asked: a pull's status (100, 408, 409)
            who = _owner(subject)
            status = (msg.headers or {}).get("Status", "reply")  # 100 heartbeat, 408 expired
            self._count(SERVER, (who,), f"pull status {status}")
        elif subject.startswith("baton."):
            sender, listeners = BROADCASTS.get(subject.split(".")[1], ("?", ()))
            self._count(sender, listeners, f"core {_root(subject)}")
        else:
            self._count("?", (), f"other {_root(subject)}")

    async def start(self, nc: NATS) -> None:
        async def on_msg(msg: Msg) -> None:
            self.see(msg)

        self._sub = await nc.subscribe(">", cb=on_msg)
        await nc.flush()
        self.started = time.monotonic()

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def per_step(self, steps: int, services: tuple[str, ...]) -> dict[str, dict[str, object]]:
        """For each of ``services``: messages sent and received per step, in
        all and by kind (kinds under 0.01 per step left out)."""
        out: dict[str, dict[str, object]] = {}
        for name in services:
            row: dict[str, object] = {}
            for way, table in (("sent", self.sent), ("received", self.received)):
                c = table.get(name, Counter())
                row[way] = round(sum(c.values()) / steps, 2)
                row[f"{way}_by_kind"] = {
                    k: round(v / steps, 2)
                    for k, v in sorted(c.items(), key=lambda kv: -kv[1])
                    if v / steps >= 0.01
                }
            out[name] = row
        return out
