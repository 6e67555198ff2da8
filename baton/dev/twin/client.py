"""The twin's stand-in for nats-py's client: the part of it that the pull loop
(``baton.bus.pull.PullStream``) uses — an inbox, the pull request published
to ``CONSUMER.MSG.NEXT`` and the status messages nats-server answers with —
so the twin runs ``Bus.consume``'s one loop as it is. Any other use raises
``NotImplementedError`` (``_Unplugged``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import nats.errors
from nats.aio.msg import Msg

from .streams import _Pull

if TYPE_CHECKING:
    from .bus import TwinBus

Callback = Callable[[Msg], Awaitable[None]]


class _Unplugged:
    """Stands where ``Bus`` keeps nats-py's client: any use names what the
    twin does not simulate."""

    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError(
            f"the bus twin does not simulate nats-py's {name!r}: test this on a real nats-server"
        )


class _Subscription:
    """An inbox: what arrives is handed to ``cb`` one message at a time, in
    order, by a task of its own (as nats-py's)."""

    def __init__(self, client: _Client, subject: str, cb: Callback) -> None:
        self._client, self._subject = client, subject
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(cb))

    async def _run(self, cb: Callback) -> None:
        while True:
            msg = await self.queue.get()
            with contextlib.suppress(Exception):  # nats-py reports it to error_cb
                await cb(msg)
            self.queue.task_done()

    async def drain(self) -> None:
        """Take no more; return once what arrived was handled."""
        if self._client.inboxes.pop(self._subject, None) is not None:
            await self.queue.join()
        self.task.cancel()

    unsubscribe = drain


class _Client(_Unplugged):
    """nats-py's client, as far as the pull loop uses it."""

    def __init__(self, twin: TwinBus) -> None:
        self._twin = twin
        self._ids = itertools.count(1)
        self.inboxes: dict[str, _Subscription] = {}
        self.stats = {"reconnects": 0}  # the twin never reconnects

    @property
    def is_closed(self) -> bool:
        return self._twin.closed

    def new_inbox(self) -> str:
        return f"_INBOX.twin.{next(self._ids)}"

    async def subscribe(self, subject: str, *, cb: Callback) -> _Subscription:
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        sub = self.inboxes[subject] = _Subscription(self, subject, cb)
        return sub

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "") -> None:
        """A pull request: ``{"batch", "expires", "idle_heartbeat"}`` (nanoseconds)."""
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        prefix = f"{self._twin._api_prefix}.CONSUMER.MSG.NEXT."
        if not subject.startswith(prefix):
            raise NotImplementedError(f"the twin publishes pull requests only, not {subject}")
        stream, _, durable = subject[len(prefix) :].partition(".")
        c = self._twin.durables.get(durable)
        if c is None or c.spec.stream != stream:
            self.status(reply, "503", "No Responders")
            return
        ask = json.loads(payload or b"{}")
        now, beat = self._twin.now(), ask.get("idle_heartbeat", 0) / 1e9
        expires = now + ask["expires"] / 1e9 if ask.get("expires") else float("inf")
        c.waiting.append(_Pull(reply, max(1, ask.get("batch", 1)), expires, beat, now + beat))
        self._twin._wake()

    def listens(self, subject: str) -> bool:
        return subject in self.inboxes

    def deliver(self, subject: str, msg: Msg) -> None:
        inbox = self.inboxes.get(subject)
        if inbox is not None:
            inbox.queue.put_nowait(msg)

    def status(self, subject: str, code: str, description: str, *, pending: int = 0) -> None:
        headers = {"Status": code, "Description": description}
        if pending:
            headers.update({"Nats-Pending-Messages": str(pending), "Nats-Pending-Bytes": "0"})
        self.deliver(subject, Msg(cast(Any, self), subject=subject, headers=headers))

    def close(self) -> None:
        for inbox in self.inboxes.values():
            inbox.task.cancel()
        self.inboxes.clear()
