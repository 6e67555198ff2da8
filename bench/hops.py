"""Sequential round trips per model step, counted from the bus (issue #23).

A core subscription on ``>`` in Baton's account sees every message the
services exchange: requests (a reply subject in a service's ``_INBOX_``),
their replies, JetStream publishes and their acks, deliveries to pulls
(``$JS.ACK`` reply subjects). For each step of a run that ran alone (no
sibling step's time overlapping), the step's window is from its
``dispatched_at`` (before the compare-and-set that records the dispatch) to
the moment its ``step done`` event is published (after the compare-and-set
that records the answer). Inside it:

- a round trip is a request and its reply (pull requests excluded: a pull
  waits for a delivery, counted apart);
- the sequential round trips are the largest set of round trips no two of
  which overlap in time (the greedy earliest-end choice): requests made
  concurrently count once, a request made only after another's reply counts
  again. A background request that fits in a gap of the step's own chain
  (e.g. a one-way delivery) counts too, so the figure is an upper bound;
- deliveries are the JetStream messages handed to a pull (one-way hops).

One clock (this process's arrival times), so timing is exact up to the tap's
own delivery delay, the same for a request and its reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

PULL = "$JS.API.CONSUMER.MSG.NEXT."
SERVICE_INBOX = "_INBOX_"  # the services' custom inbox prefixes (_INBOX_<name>.)


@dataclass
class HopTap:
    """Every message on the bus while started, with its arrival time."""

    seen: list[tuple[float, str, str]] = field(default_factory=list)
    done_at: dict[tuple[str, str], float] = field(default_factory=dict)  # (task, step) -> t
    sub: Subscription | None = None

    async def start(self, nc: NATS) -> None:
        async def on_msg(msg: Msg) -> None:
            now = time.time()
            self.seen.append((now, msg.subject, msg.reply or ""))
            if msg.subject.startswith("baton.events.") and not msg.reply.startswith("$JS.ACK"):
                ev = msgpack.unpackb(msg.data)
                if ev.get("type") == "step" and ev.get("status") == "done" and not ev.get("call"):
                    self.done_at.setdefault((ev.get("task_id", ""), ev.get("step", "")), now)

        self.sub = await nc.subscribe(">", cb=on_msg)
        await nc.flush()

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()

    def steps(self, runs: list[tuple[str, dict[str, Any], float]]) -> list[dict[str, int]]:
        """Per step that ran alone: sequential round trips, all round trips,
        deliveries."""
        trips = _round_trips(self.seen)
        deliveries = [t for t, _, reply in self.seen if reply.startswith("$JS.ACK.")]
        out: list[dict[str, int]] = []
        for task_id, state, _ in runs:
            steps = state["steps"].items()
            ran = [(st["dispatched_at"], st["finished_at"], step_id)
                   for step_id, st in steps if st.get("status") == "done"]  # fmt: skip
            for lo, finished, step_id in ran:
                hi = self.done_at.get((task_id, step_id))
                if hi is None or any(o != step_id and a < finished and lo < b for a, b, o in ran):
                    continue  # a sibling ran beside it: its messages are not this step's
                inside = [trip for trip in trips if lo <= trip[0] and trip[1] <= hi]
                out.append({
                    "sequential": _sequential(inside),
                    "round_trips": len(inside),
                    "deliveries": sum(lo <= t <= hi for t in deliveries),
                })  # fmt: skip
        return out


Trip = tuple[float, float, str]  # request seen, reply seen, who asked (its inbox prefix)


def _round_trips(seen: list[tuple[float, str, str]]) -> list[Trip]:
    """Every answered request of a service."""
    open_: dict[str, float] = {}
    trips: list[Trip] = []
    for t, subject, reply in seen:
        if subject in open_:
            trips.append((open_.pop(subject), t, subject.split(".", 1)[0]))
        if reply.startswith(SERVICE_INBOX) and not subject.startswith(PULL):
            # A request answered by a publish with the asker's inbox as its
            # reply (the context store's ``answer``) is one round trip: from
            # the request to the ack the asker waits for.
            open_.setdefault(reply, t)
    return trips


def _sequential(trips: list[Trip]) -> int:
    """The longest chain of round trips in ``trips`` that wait on each other:
    one starting after another's reply, or made by another service inside
    another's (the context store's publish within the worker's append
    request: the outer one's answer waits for the inner one's). Requests in
    flight together count once. Weighted interval scheduling, a round trip
    weighing one plus the longest chain inside it made by others."""
    order = sorted(range(len(trips)), key=lambda i: (trips[i][1], -trips[i][0]))
    weight: dict[int, int] = {}

    def best(members: list[int]) -> int:
        # members sorted by end; f[k] = best chain among the first k
        f = [0] * (len(members) + 1)
        for k, i in enumerate(members, 1):
            start = trips[i][0]
            j = k - 1
            while j > 0 and trips[members[j - 1]][1] > start:
                j -= 1
            f[k] = max(f[k - 1], f[j] + w(i))
        return f[-1]

    def w(i: int) -> int:
        if i not in weight:
            lo, hi, who = trips[i]
            inner = [j for j in order if trips[j][2] != who and lo <= trips[j][0]
                     and trips[j][1] <= hi]  # fmt: skip
            weight[i] = 1 + best(inner)
        return weight[i]

    return best(order)
