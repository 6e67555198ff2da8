"""The other orchestrator replicas, as their load beacons tell them.

Each replica publishes, every ``BATON_REPLICA_LOAD_EVERY`` seconds, the
tokens its runs hold (``ReplicaLoad`` on core NATS
``baton.orchestrators.load.<replica>``) and keeps the last beacon of each
peer; a peer not heard from for three of its intervals is gone (it stopped,
or its link did) and holds nothing. The fair gate lends idle shares out of
what the pools hold less what the peers hold, split between the live
replicas (``fairness.Replicas``): without it every replica would lend the
whole pool. Its own beacon, which the subscription hears too, is skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from baton.bus import Bus
from proto import subjects
from proto.messages import ReplicaLoad

from .fairness import Replicas

log = structlog.get_logger("orchestrator")

MISSED = 3  # intervals without a beacon after which a peer is gone


class ReplicaLoads:
    """The peers' last beacons and this replica's own (``view``: what the
    fair gate needs); ``now`` is a monotonic clock, a parameter for tests."""

    def __init__(
        self, replica: str, every: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.replica, self.every, self.clock = replica, every, clock
        self.peers: dict[str, tuple[ReplicaLoad, float]] = {}  # replica -> (beacon, heard at)
        self.here = 0.0  # tokens this replica held at its last beacon

    def beacon(self, held: float) -> ReplicaLoad:
        """This replica's beacon, holding ``held`` tokens now."""
        self.here = held
        return ReplicaLoad(
            replica=self.replica, held_tokens=round(held), every=self.every, at=time.time()
        )

    def heard(self, load: ReplicaLoad, subject: str) -> None:
        """A beacon: a peer's is kept, this replica's own (or one whose
        subject is not its replica's) ignored."""
        if (
            load.replica == self.replica
            or subject != f"{subjects.ORCHESTRATOR_LOAD}.{load.replica}"
        ):
            return
        if load.replica not in self.peers:
            log.info("replica_joined", replica=load.replica)
        self.peers[load.replica] = (load, self.clock())

    def live(self) -> dict[str, ReplicaLoad]:
        """The peers heard from within ``MISSED`` of their intervals (or of
        this replica's, if longer); the others are forgotten."""
        now = self.clock()
        for replica, (load, at) in list(self.peers.items()):
            if now - at > MISSED * max(self.every, load.every):
                del self.peers[replica]
                log.info("replica_gone", replica=replica)
        return {r: load for r, (load, _) in self.peers.items()}

    def view(self) -> Replicas:
        peers = self.live()
        return Replicas(count=1 + len(peers), here=self.here,
                        elsewhere=float(sum(p.held_tokens for p in peers.values())))  # fmt: skip

    async def run(self, bus: Bus, held: Callable[[], float]) -> None:
        """Hear the peers' beacons and send this replica's, ``held()`` tokens,
        every ``every`` seconds until cancelled."""
        await bus.subscribe(f"{subjects.ORCHESTRATOR_LOAD}.*", ReplicaLoad, self._on_beacon)
        while True:
            try:
                await bus.notify(subjects.orchestrator_load(self.replica), self.beacon(held()))
            except Exception as exc:  # NATS reconnecting: the next beacon tells them
                log.warning("replica_load_publish_failed", error=repr(exc))
            await asyncio.sleep(self.every)

    async def _on_beacon(self, load: ReplicaLoad, subject: str) -> None:
        self.heard(load, subject)
