"""A generation's token sink on the bus twin: an answer generated whole
within one interval is one delta (the final one), and a longer one's first
text goes out within about one interval of being generated."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Histogram

from baton.dev.twin import TwinBus
from proto import codec
from proto.messages import ContextRef, InferenceJob, TokenDelta
from proto.streams import TOKENS
from services.inference_worker.deltas import TokenPublisher

BASE = 0.03  # BATON_TOKEN_INTERVAL's default


def _job(n: int = 0) -> InferenceJob:
    ref = ContextRef(tenant="acme", session="s1", version=1, sig=b"x")
    return InferenceJob(job_id=f"j{n}", task_id=f"t{n}", tenant="acme", session="s1",
                        workflow="chat", step="answer", agent="assistant", ref=ref,
                        max_tokens=128)  # fmt: skip


async def _twin() -> TwinBus:
    twin = TwinBus()
    await twin.provision(streams=[TOKENS])
    return twin


def _deltas(twin: TwinBus) -> list[TokenDelta]:
    stored = twin.streams[TOKENS.name].msgs
    return [codec.decode(stored[seq].data, TokenDelta) for seq in sorted(stored)]


async def test_an_answer_generated_within_one_interval_is_one_final_delta() -> None:
    twin = await _twin()
    sink = TokenPublisher(twin, BASE).open(_job(), attempt="1.1")
    for word in ("a ", "whole ", "answer"):
        sink.add(word)
        await asyncio.sleep(0)  # the engine hands chunks over one at a time
    await sink.close(final=True)
    got = _deltas(twin)
    assert [(d.index, d.text, d.final) for d in got] == [(0, "a whole answer", True)]


async def test_a_longer_answers_first_text_goes_out_within_about_one_interval() -> None:
    twin = await _twin()
    sink = TokenPublisher(twin, BASE).open(_job(), attempt="1.1")
    first = time.time()
    sink.add("first ")
    while not _deltas(twin) and time.time() - first < 1.0:
        await asyncio.sleep(0.002)
    got = _deltas(twin)
    assert got and got[0].text == "first " and not got[0].final
    assert got[0].ts - first < 2 * BASE, got[0].ts - first
    sink.add("then the rest")
    await sink.close(final=True)
    got = _deltas(twin)
    assert "".join(d.text for d in got) == "first then the rest" and got[-1].final
    assert [d.index for d in got] == list(range(len(got)))


async def test_a_final_delta_taken_for_the_store_observes_its_lag() -> None:
    registry = CollectorRegistry()
    lag = Histogram("lag_seconds", "a delta's lag", registry=registry)
    sink = TokenPublisher(await _twin(), BASE, lag=lag).open(_job(), attempt="1.1")
    sink.add("a whole answer")
    delta = await sink.take_final()
    assert delta is not None and delta.final and delta.text == "a whole answer"
    # The answer's only delta leaves with the answer, not through a flush.
    assert registry.get_sample_value("lag_seconds_count") == 1
