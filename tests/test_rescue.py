"""A dead peer's own consumer is pulled dry by a live worker of its pool and
then deleted (``services/inference_worker/rescue.py``), on a real nats-server."""

from __future__ import annotations

import asyncio

from baton.bus import Consumption, Delivery, connect
from baton.dev.testing import uid
from proto import subjects
from proto.streams import JOBS, ConsumerSpec, direct_consumer
from services.inference_worker.rescue import Peers, Rescuer


async def test_a_dead_peers_jobs_are_all_handled_before_its_consumer_is_deleted(
    nats_url: str,
) -> None:
    bus = await connect(nats_url, name="test-rescue")
    try:
        pool, dead = uid("pool"), uid("w")
        spec = direct_consumer(pool, dead, ack_wait=30.0)
        await bus.provision(streams=[JOBS], consumers=[spec])
        for i in range(3):
            await bus.publish(subjects.worker_job(pool, dead), f"job-{i}".encode())
        slow = asyncio.Event()
        done: list[bytes] = []
        running: set[asyncio.Task[None]] = set()

        async def handle(d: Delivery) -> None:
            if d.data == b"job-0":  # a long generation: held while the rest are done
                await slow.wait()
            done.append(d.data)

        def pull(s: ConsumerSpec) -> Consumption:  # as the worker's: its handlers outlive the loop
            return bus.consume(s, handle, running=running, finish=False)

        peers = Peers("me", stale_after=0.0)
        peers.left.add(dead)
        rescuer = Rescuer(bus, pool, peers, pull, every=0.05)
        await rescuer._scan()
        async with asyncio.timeout(5):
            while len(done) < 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert spec.durable in {c.name for c in await bus.consumers(JOBS.name)}  # job-0 runs
        slow.set()
        async with asyncio.timeout(5):
            while rescuer.active:
                await asyncio.sleep(0.02)
        assert sorted(done) == [b"job-0", b"job-1", b"job-2"]
        assert spec.durable not in {c.name for c in await bus.consumers(JOBS.name)}
    finally:
        await bus.close()
