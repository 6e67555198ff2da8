"""Token deltas are batched by time and by the number of open streams: the
messages a generation sends follow its duration, never its token count, and
many generations at once share the worker's delta rate (real nats-server,
simulator worker at 400 tokens/s per sequence, chat answers of 128 tokens)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from baton.dev.testing import Client, LocalStack, secure_nats, uid
from services.inference_worker.deltas import DEFAULT_CEILING, STREAMS_PER_BASE, batch_interval

BASE = 0.03  # BATON_TOKEN_INTERVAL's default
TPS = 400  # a 128-token answer takes ~0.32 s: ~11 base intervals


def test_the_interval_grows_with_open_streams_up_to_its_ceiling() -> None:
    assert batch_interval(0.03, 1) == batch_interval(0.03, STREAMS_PER_BASE) == 0.03
    assert batch_interval(0.03, 4 * STREAMS_PER_BASE) == pytest.approx(0.12)
    assert batch_interval(0.03, 1000, ceiling=0.25) == 0.25
    assert batch_interval(0.5, 1000, ceiling=0.25) == 0.5  # never below the base
    # The documented bound: 30-250 ms between a stream's deltas, whatever the load.
    assert all(0.03 <= batch_interval(0.03, n) <= DEFAULT_CEILING == 0.25 for n in range(500))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("batching")
    server = secure_nats(tmp / "nats").start()
    s = LocalStack(server, tmp / "s", env={"BATON_SIM_DECODE_TPS": str(TPS)})
    try:
        s.start()
        yield s
    finally:
        s.stop()
        server.stop()


async def _chats(stack: LocalStack, n: int) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """``n`` chat tasks at once; their terminal events and their deltas."""
    client = await Client.connect(stack.nats_url)
    deltas: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def on_delta(msg: Any) -> None:
        d = msgpack.unpackb(msg.data)
        deltas[d["task_id"]].append(d)

    sub = await client.nc.subscribe("baton.tokens.acme.>", cb=on_delta)
    try:
        done = await asyncio.gather(*(
            client.run("chat", {"tenant": "acme", "input": f"tell story {i}", "task_id": uid()},
                       timeout=60)
            for i in range(n)
        ))  # fmt: skip
        await asyncio.sleep(0.3)  # the last deltas' core-NATS copies
    finally:
        await sub.unsubscribe()
        await client.close()
    assert all(d["type"] == "completed" for d in done), done
    for d in done:  # the contract holds: in order, no gap, the stored answer
        got = sorted(deltas[d["task_id"]], key=lambda x: x["index"])
        assert [x["index"] for x in got] == list(range(len(got)))
        assert "".join(x["text"] for x in got) == d["output"] and got[-1]["final"]
    return done, deltas


def _duration(ds: list[dict[str, Any]]) -> float:
    return max(x["ts"] for x in ds) - min(x["ts"] for x in ds)


async def test_one_generation_sends_deltas_by_time_not_by_token(stack: LocalStack) -> None:
    done, deltas = await _chats(stack, 1)
    ds = deltas[done[0]["task_id"]]
    tokens = done[0]["usage"]["completion_tokens"]
    assert tokens == 128
    # One per tick while it generates (the first text waits for one), the final one.
    assert len(ds) <= 3 + _duration(ds) / BASE, (len(ds), _duration(ds))
    assert 3 <= len(ds) <= tokens / 6, len(ds)  # live, yet many tokens to a delta


async def test_concurrent_generations_share_the_workers_delta_rate(stack: LocalStack) -> None:
    n = 24  # 6x STREAMS_PER_BASE: the interval grows to ~6x the base (180 ms)
    done, deltas = await _chats(stack, n)
    middle = [len(deltas[d["task_id"]]) - 2 for d in done]  # without first and final
    alone = [_duration(deltas[d["task_id"]]) / BASE for d in done]  # one stream's ticks
    # Each stream on its own base interval would send ~``alone`` deltas; sharing
    # the rate, 24 open streams send about a sixth of that.
    assert sum(middle) <= 0.4 * sum(alone), (sum(middle), sum(alone))
    # Yet every reader still sees its stream move: no gap between two of a
    # stream's deltas much beyond the ceiling (a tick skips a stream whose
    # previous delta is still in flight, hence the slack).
    gaps = [b["ts"] - a["ts"] for ds in deltas.values()
            for a, b in zip(sorted(ds, key=lambda x: x["index"]),
                            sorted(ds, key=lambda x: x["index"])[1:], strict=False)]  # fmt: skip
    assert max(gaps) < 2 * DEFAULT_CEILING, max(gaps)
    window = max(x["ts"] for ds in deltas.values() for x in ds) - min(
        x["ts"] for ds in deltas.values() for x in ds
    )
    assert sum(middle) <= 1.5 * window * STREAMS_PER_BASE / BASE + n, (sum(middle), window)
