"""How well the orchestrator predicts a step before dispatching it: the
GPU-seconds and queue wait on the ``step started`` event's ``prediction``
against what the step's ``done`` event says it used, on real processes.

Two pools of simulator workers (``BATON_ENGINE=sim``: the engine sleeps its
configured prefill and decode speeds; the catalogue states rougher figures,
so the speeds the workers measure and report in heartbeats are what the
prediction uses). One agent may run on either pool; tasks of mixed prompt
lengths (~100 to ~1,800 tokens) arrive in waves of 1, 4 and 12 at once, so
the engines are shared and the queues fill. Then a trickle: 12 tasks one
every 0.3 s (a quarter of a run), so each step shares its engine with steps
that arrive after it was placed — reported on its own, apart from the waves.
Beside the errors, two bounds: the error had the answer length been known
(``oracle``) and what any guess of the length errs by (``length_floor``).

The simulated agent answers short (about ``ANSWER`` tokens of its
``max_tokens`` 96, spread +-``SPREAD``, as the sim draws it from the
prompt), and the whole run is made in each mode, interleaved over
``ROUNDS`` rounds, each on a fresh stack (an orchestrator starts with
nothing learnt): ``learnt`` (the default) predicts at the agent's learnt
answer length, sharing the engine with the steps already placed while
their predicted runs overlap its own and with the steps expected to join
it (``BATON_EXPECT_ARRIVALS``), its prefill by its tokens
(``BATON_PREFILL_BY_TOKENS``); ``by_speed`` with neither (the prediction
before them), ``by_tokens`` and ``arrivals`` with one each. Modes of
earlier runs (counts as read, answers learnt from 5, the median answer,
the batched prefill fit) are described in ``MODE_TEXT`` and
docs/scheduling.md.

    python -m bench placement          # writes bench/results/placement.json

Error of one step: GPU-seconds actual / predicted - 1; queue wait: seconds
waited (queue + admission phases) minus the predicted wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baton.dev.testing import Client, LocalStack, secure_nats, uid
from bench.stats import pct

WAVES = (1, 1, 1, 4, 4, 12, 12)
TRICKLE = (12, 0.3)  # tasks, seconds between two (their rows: wave 0)
ANSWER, SPREAD = 32, 0.25  # the agent's answers: tokens, +- fraction
ROUNDS = 2
# The time model under sharing (prefill by tokens, arrivals expected) against
# the one before it (``by_speed``), together and apart.
BY_SPEED = {"BATON_PREFILL_BY_TOKENS": "false", "BATON_EXPECT_ARRIVALS": "false"}
MODES = {"by_speed": BY_SPEED,
         "by_tokens": {"BATON_EXPECT_ARRIVALS": "false"},
         "arrivals": {"BATON_PREFILL_BY_TOKENS": "false"},
         "learnt": {}}  # fmt: skip
if only := os.environ.get("BATON_BENCH_MODES"):  # a subset, to study one
    MODES = {m: MODES[m] for m in only.split(",")}
LENGTHS = (20, 150, 450)  # words of the input: ~30, ~200, ~600 tokens by the 4-bytes estimate
WORKFLOW = textwrap.dedent("""\
    name: ask
    agents:
      assistant:
        role: assistant
        system: You answer briefly.
        max_tokens: 96
        pools: [small, large]
    steps:
      - {id: answer, agent: assistant}
    """)
# Rough figures, as an operator would first write them; the workers measure.
POOLS = {
    "small": {"max_model_len": 2048, "usd_per_gpu_hour": 1.0, "prefill_tps": 4000,
              "decode_tps": 50, "max_seqs": 8, "cold_start_s": 60},
    "large": {"max_model_len": 8192, "usd_per_gpu_hour": 4.0, "prefill_tps": 8000,
              "decode_tps": 80, "max_seqs": 8, "cold_start_s": 90},
}  # fmt: skip
WORKER = {"small": {"BATON_MAX_MODEL_LEN": "2048", "BATON_SIM_PREFILL_TPS": "6000",
                    "BATON_SIM_DECODE_TPS": "80", "BATON_MAX_NUM_SEQS": "8"},
          "large": {"BATON_MAX_MODEL_LEN": "8192", "BATON_SIM_PREFILL_TPS": "12000",
                    "BATON_SIM_DECODE_TPS": "120", "BATON_MAX_NUM_SEQS": "8"}}  # fmt: skip


async def _task(client: Client, text: str, wave: int) -> dict[str, Any]:
    body = {"tenant": "acme", "task_id": uid(), "input": text}
    await client.publish("ask", body, msg_id=body["task_id"])
    events = await client.events("acme", body["task_id"], timeout=300)
    steps = [e for e in events if e["type"] == "step" and e.get("step") == "r1.answer"]
    started = next(e for e in steps if e["status"] == "started")
    done = next(e for e in steps if e["status"] in ("done", "failed"))
    phases = done.get("phases") or {}
    return {
        "ok": events[-1]["type"] == "completed",
        "wave": wave,
        "pool": done.get("pool"),
        "reason": done.get("pool_reason"),
        "predicted": started["prediction"],
        "completion_tokens": (done.get("usage") or {}).get("completion_tokens", 0),
        "gpu_seconds": (done.get("usage") or {}).get("gpu_seconds", 0.0),
        "waited_s": phases.get("queue", 0.0) + phases.get("admission", 0.0),
        "ran_s": phases.get("prefill", 0.0) + phases.get("decode", 0.0),
        "decode_s": phases.get("decode", 0.0),
        "prefill_s": phases.get("prefill", 0.0),
        "prompt_tokens": (done.get("usage") or {}).get("prompt_tokens", 0),
    }


def text(i: int) -> str:
    """The ``i``-th task's input (``LENGTHS`` in turn; ``i < 0``: a warm-up's)."""
    if i < 0:
        return "warm up " + "word " * LENGTHS[-1 - i]
    return f"[{i}] " + "word " * LENGTHS[i % len(LENGTHS)]


async def drive(
    client: Client,
    waves: tuple[int, ...],
    trickle: tuple[int, float],
    settle: float = 0.6,
    make: Callable[[int], str] = text,
) -> list[dict[str, Any]]:
    """The load: a warm-up of ``len(LENGTHS)`` tasks (the workers measure
    their speeds on a few generations; the orchestrator learns from them),
    the ``waves`` of tasks at once (``settle`` s apart: the next wave sees
    the pools settle), then the ``trickle`` (tasks, seconds between two; its
    rows are wave 0). ``make(i)``: the ``i``-th task's input."""
    for n in range(len(LENGTHS)):
        await _task(client, make(-1 - n), 1)
    await asyncio.sleep(1.0)
    rows: list[dict[str, Any]] = []
    i = 0
    for wave in waves:
        rows += await asyncio.gather(*(_task(client, make(i + k), wave) for k in range(wave)))
        i += wave
        await asyncio.sleep(settle)
    tasks = []
    for _ in range(trickle[0]):
        tasks.append(asyncio.create_task(_task(client, make(i), 0)))
        i += 1
        await asyncio.sleep(trickle[1])
    rows += await asyncio.gather(*tasks)
    return rows


async def _main(work: Path, mode: dict[str, str]) -> list[dict[str, Any]]:
    flows = work / "workflows"
    flows.mkdir(parents=True)
    (flows / "ask.yaml").write_text(WORKFLOW)
    server = secure_nats(work / "nats").start()
    stack = LocalStack(server, work / "stack", env={"BATON_HEARTBEAT_INTERVAL": "0.5"})
    stack.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        stack.service("context-store").wait_ready()
        stack.service("orchestrator", BATON_WORKFLOWS_DIR=str(flows),
                      BATON_POOLS=json.dumps(POOLS), BATON_PENDING_POLL_INTERVAL="0.5",
                      BATON_ROUTE_STALE_AFTER="3", **mode).wait_ready()  # fmt: skip
        for pool, env in WORKER.items():
            stack.worker(BATON_POOL=pool, BATON_ENGINE="sim", BATON_SIM_ANSWER_TOKENS=str(ANSWER),
                         BATON_SIM_ANSWER_SPREAD=str(SPREAD), **env).wait_ready()  # fmt: skip
        client = await Client.connect(server.url)
        await asyncio.sleep(1.5)  # heartbeats in
        rows = await drive(client, WAVES, TRICKLE)
        await client.close()
    finally:
        stack.stop()
        server.stop()
    return rows


def _errors(ok: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Absolute errors: GPU-seconds (relative) and queue wait (seconds)."""
    gpu = [abs(r["gpu_seconds"] / r["predicted"]["gpu_seconds"] - 1.0) for r in ok]
    return gpu, [abs(r["waited_s"] - r["predicted"]["wait_s"]) for r in ok]


def oracle(r: dict[str, Any]) -> float | None:
    """The step's GPU-seconds error had its answer length been known: the
    predicted GPU-seconds with their decode part (the step's decode share of
    its run) rescaled by actual / predicted answer tokens. What remains is
    the sharing and the speeds."""
    said, ran = r["predicted"].get("output_tokens", 0), r.get("ran_s", 0.0)
    if said <= 0 or ran <= 0 or r["gpu_seconds"] <= 0:
        return None
    d = r.get("decode_s", 0.0) / ran
    known = r["predicted"]["gpu_seconds"] * (1.0 + d * (r["completion_tokens"] / said - 1.0))
    return abs(r["gpu_seconds"] / known - 1.0) if known > 0 else None


def length_floor(lengths: list[int], q: float = 0.9) -> float | None:
    """The ``q`` quantile of |answer / guess - 1| for the best single guess:
    what any prediction of the answer length that cannot tell these answers
    apart errs by (the simulator draws them +-``SPREAD`` of ``ANSWER``, from
    a hash of the prompt)."""
    if not lengths:
        return None
    guesses = range(min(lengths), max(lengths) + 1)
    return min(pct([abs(n / c - 1.0) for n in lengths], q) for c in guesses)


def summary(
    rows: list[dict[str, Any]],
    machine: str = f"{os.cpu_count()} cores, simulator engines, 2 pools x 1 worker",
    waves: tuple[int, ...] = WAVES,
    trickle: tuple[int, float] = TRICKLE,
) -> dict[str, Any]:
    """Prediction errors of the finished steps of ``rows`` (``_task``'s)."""
    done = [r for r in rows if r["ok"] and r["predicted"]["gpu_seconds"] > 0]
    ok = [r for r in done if r["wave"] > 0]  # the waves; the trickle apart
    tg, tw = _errors([r for r in done if r["wave"] == 0])
    gpu = [r["gpu_seconds"] / r["predicted"]["gpu_seconds"] - 1.0 for r in ok]
    wait = [r["waited_s"] - r["predicted"]["wait_s"] for r in ok]
    absg = [abs(e) for e in gpu]
    # The sharing alone, apart from the answer length: the sequences the step
    # was predicted to share its engine with (predicted run / GPU-seconds)
    # against those it shared it with (its run / GPU-seconds charged).
    shared = [
        abs(r["predicted"]["run_s"] / r["predicted"]["gpu_seconds"]
            / (r["ran_s"] / r["gpu_seconds"]) - 1.0)
        for r in done if r.get("ran_s", 0) > 0 and r["gpu_seconds"] > 0
    ]  # fmt: skip
    known = [e for e in map(oracle, done) if e is not None]
    floor = length_floor([r["completion_tokens"] for r in done if r["completion_tokens"] > 0])
    absw = [abs(e) for e in wait]
    alone = [abs(e) for e, r in zip(gpu, ok, strict=True) if r["wave"] == 1]
    burst = [abs(e) for e, r in zip(gpu, ok, strict=True) if r["wave"] > 1]
    said = [r["predicted"].get("output_tokens", 0) for r in ok]
    answered = [r["completion_tokens"] for r in ok]
    by_pool: dict[str, int] = {}
    for r in ok:
        by_pool[f"{r['pool']}/{r['reason']}"] = by_pool.get(f"{r['pool']}/{r['reason']}", 0) + 1
    return {
        "machine": machine,
        "steps": len([r for r in rows if r["wave"] > 0]),
        "completed": len(ok),
        "waves": list(waves),
        "placements": by_pool,
        "gpu_seconds_abs_error_p50": round(pct(absg, 0.5), 3),
        "gpu_seconds_abs_error_p90": round(pct(absg, 0.9), 3),
        "gpu_seconds_error_p50": round(pct(gpu, 0.5), 3),
        "alone_abs_error_p90": round(pct(alone, 0.9), 3) if alone else None,
        "burst_abs_error_p90": round(pct(burst, 0.9), 3) if burst else None,
        "within_20pct": round(sum(e <= 0.2 for e in absg) / max(1, len(absg)), 3),
        "sharing_abs_error_p50": round(pct(shared, 0.5), 3) if shared else None,
        "sharing_abs_error_p90": round(pct(shared, 0.9), 3) if shared else None,
        # Bounds, waves and trickle together: the error with the answer
        # length known exactly, and what a length guess errs by at best.
        "oracle_abs_error_p90": round(pct(known, 0.9), 3) if known else None,
        "answer_length_floor_p90": round(floor, 3) if floor is not None else None,
        "queue_wait_abs_error_p50_s": round(pct(absw, 0.5), 3),
        "queue_wait_abs_error_p90_s": round(pct(absw, 0.9), 3),
        "mean_gpu_seconds": round(sum(r["gpu_seconds"] for r in ok) / max(1, len(ok)), 3),
        "learnt_steps": sum(bool(r["predicted"].get("learnt")) for r in ok),
        "output_tokens_predicted_p50": pct(said, 0.5) if said else None,
        "output_tokens_actual_p50": pct(answered, 0.5) if answered else None,
        "trickle": list(trickle),
        "trickle_completed": len(tg),
        "trickle_gpu_seconds_abs_error_p50": round(pct(tg, 0.5), 3) if tg else None,
        "trickle_gpu_seconds_abs_error_p90": round(pct(tg, 0.9), 3) if tg else None,
        "trickle_queue_wait_abs_error_p90_s": round(pct(tw, 0.9), 3) if tw else None,
        # Each step: pool, wave, predicted and actual GPU-seconds, predicted
        # and actual wait, predicted and actual answer tokens.
        "rows": [
            [
                r["pool"],
                r["wave"],
                r["predicted"]["gpu_seconds"],
                round(r["gpu_seconds"], 4),
                r["predicted"]["wait_s"],
                round(r["waited_s"], 3),
                r["predicted"].get("output_tokens", 0),
                r["completion_tokens"],
            ]
            for r in rows
        ],
    }


def run(work: Path) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i in range(ROUNDS):
        for name, env in MODES.items():  # interleaved: each round runs every mode
            rows[name] += asyncio.run(_main(work / f"{name}-{i}", env))
    modes = {name: summary(r) for name, r in rows.items()}
    out = {k: v for k, v in modes.get("learnt", next(iter(modes.values()))).items() if k != "rows"}
    out |= {"answer_tokens": ANSWER, "answer_spread": SPREAD, "rounds": ROUNDS, "modes": modes,
            "mode_text": {m: MODE_TEXT[m] for m in MODES}}  # fmt: skip
    return out


MODE_TEXT = {
    "learnt": "(default) predicts at the agent's learnt answer length (the 0.8 quantile of "
    "its last 64 answers to prompts within 1.5x as long as the step's once two are known, "
    "else of all of them; from the first seen), sharing the engine with the steps placed "
    "before it while their predicted runs overlap its own, from the pool's counts "
    "(heartbeats, polled queue) reconciled with the answers and placements seen since they "
    "were read, at prefill and decode speeds fitted from the steps seen finish, the prefill "
    "by its tokens (a fixed cost + per token, fitted from steps alone, with the pool's "
    "typical prefill for each sequence sharing it) and steps expected to join at the rate "
    "they joined running batches lately",
    "by_speed": "as `learnt` with the prefill at a speed slowed by the batch and no arrivals "
    "expected (`BATON_PREFILL_BY_TOKENS=false`, `BATON_EXPECT_ARRIVALS=false`: the "
    "prediction before this change)",
    "batched_fit": "as `learnt` with the prefill's cost per token fitted from the steps seen "
    "in a batch too, on an engine that runs a batch's prefills one after the other (each "
    "one's time to its first token against its tokens and the others' typical ones; "
    "measured once, no gain: not kept)",
    "by_tokens": "as `learnt` with no arrivals expected (`BATON_EXPECT_ARRIVALS=false`)",
    "arrivals": "as `learnt` with the prefill by speed (`BATON_PREFILL_BY_TOKENS=false`)",
    "learnt_as_read": "the same from the counts as read (`BATON_RECONCILE_COUNTS=false`)",
    "learnt_min5": "the same predicting `max_tokens` until 5 answers are seen "
    "(`BATON_ANSWER_MIN_SEEN=5`)",
    "before": "all off: counts as read, `max_tokens` until 5 answers, speeds from the "
    "heartbeats, as `by_speed` (the prediction before the changes of issue 20)",
    "learnt_hb_speeds": "as `learnt` with the speeds of the heartbeats, the decode slowdown "
    "fitted once steps spread over batch sizes (`BATON_SPEEDS_FROM_STEPS=false`)",
    "learnt_median": "as `learnt` at the median answer (`BATON_ANSWER_QUANTILE=0.5`)",
    "learnt_agentwide": "as `learnt` from all the agent's answers, whatever the step's prompt "
    "length (`BATON_ANSWER_PROMPT_NEAR=1.0`; the prediction before answers were conditioned "
    "on the prompt)",
    # Modes of earlier runs (their JSON), described as they were then.
    "max_tokens": "every answer at its cap (`BATON_LEARN_ANSWERS=false`)",
    "learnt_count": "every sequence ahead counted as sharing the step's whole run "
    "(`BATON_SHARE_BY_OVERLAP=false`)",
}
"""What each mode predicts with (docs/benchmarks.md)."""


def table(modes: dict[str, dict[str, Any]]) -> list[str]:
    """The modes' errors, a markdown table's lines."""
    rows = [
        f"| {name} | {m['gpu_seconds_abs_error_p50']:.1%} | {m['gpu_seconds_abs_error_p90']:.1%} "
        f"| {m['within_20pct']:.0%} | {m['gpu_seconds_error_p50']:+.1%} "
        f"| {m.get('output_tokens_predicted_p50')} / {m.get('output_tokens_actual_p50')} "
        f"| {m['queue_wait_abs_error_p50_s']:.2f} / {m['queue_wait_abs_error_p90_s']:.2f} s "
        f"| {_pct_or_dash(m.get('trickle_gpu_seconds_abs_error_p90'))} "
        f"| {_pct_or_dash(m.get('sharing_abs_error_p50'))} / "
        f"{_pct_or_dash(m.get('sharing_abs_error_p90'))} "
        f"| {_pct_or_dash(m.get('oracle_abs_error_p90'))} / "
        f"{_pct_or_dash(m.get('answer_length_floor_p90'))} |"
        for name, m in modes.items()
    ]
    return [
        "| mode | GPU-s p50 abs error | p90 abs error | within ±20% | median signed error "
        "| answer tokens predicted / actual (p50) | queue wait abs error p50 / p90 "
        "| trickle GPU-s p90 abs error | sharing abs error p50 / p90 "
        "| p90 with the answer length known / length floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]


def markdown(r: dict[str, Any]) -> str:
    modes = r.get("modes") or {"learnt": r}
    # Met only if the trickle's steps are within it too (the headline is the waves').
    trickle = r.get("trickle_gpu_seconds_abs_error_p90") or 0.0
    goal = "met" if max(r["gpu_seconds_abs_error_p90"], trickle) <= 0.2 else "missed"
    return "\n".join([
        "## Step prediction error (`python -m bench placement`)",
        "",
        f"{r['machine']}; {r['completed']} of {r['steps']} steps completed per mode, in waves of "
        f"{', '.join(map(str, r['waves']))} tasks at once over {r.get('rounds', 1)} rounds, modes "
        f"interleaved; placements {r['placements']}. The agent's `max_tokens` is 96; the "
        f"simulator answers about {r.get('answer_tokens')} tokens "
        f"(±{r.get('answer_spread', 0):.0%}, drawn from the prompt). Error = actual / "
        "predicted GPU-seconds - 1 (the step's `done` "
        "usage against the `prediction` on its `started` event). Modes: "
        + "; ".join(f"`{m}` {r.get('mode_text', MODE_TEXT).get(m, '')}" for m in modes) + ".",
        "",
        *table(modes),
        "",
        f"Goal (within ±20% GPU-seconds at p90), default `learnt` mode: **{goal}** "
        f"({r['gpu_seconds_abs_error_p90']:.1%}; {r.get('learnt_steps')} of {r['completed']} "
        f"steps predicted from a learnt length, the others before any answer was seen). p90 abs "
        f"error of steps sent alone: {r.get('alone_abs_error_p90')}; in waves of 4 and 12: "
        f"{r.get('burst_abs_error_p90')}.",
        *_trickle(r),
        *relabelled(r),
        "",
        "Sharing error (a diagnostic, waves and trickle together): the sequences a step was "
        "predicted to share its engine with (predicted run / predicted GPU-seconds) against "
        "those it shared it with (its prefill + decode / GPU-seconds charged) - 1: about the "
        "GPU-seconds error the step would have with its run time (answer length, speeds) "
        "predicted exactly.",
        "",
        "Bounds (waves and trickle together): *p90 with the answer length known* is the "
        "GPU-seconds error had each step's answer length been predicted exactly (its "
        "prediction's decode part, the step's decode share of its run, rescaled by actual / "
        "predicted tokens; what is left is sharing and speeds); the *length floor* is the p90 "
        "of |answer / guess - 1| for the best single guess of the answers' lengths: what a "
        "length prediction that cannot tell them apart errs by on the decode part. The "
        f"simulator draws each answer uniformly within ±{r.get('answer_spread', 0):.0%} of "
        f"{r.get('answer_tokens')} tokens from a hash of the prompt, so no predictor tells "
        "them apart: a step's GPU-seconds error is bounded below by about its decode share "
        "times that floor.",
    ])  # fmt: skip


def relabelled(r: dict[str, Any]) -> list[str]:
    """The note of a run whose modes were renamed after it (a setting reverted since)."""
    return ["", r["relabelled"]] if r.get("relabelled") else []


def _pct_or_dash(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def _trickle(r: dict[str, Any]) -> list[str]:
    if r.get("trickle_gpu_seconds_abs_error_p90") is None:
        return []
    n, gap = r["trickle"]
    return [
        "",
        f"Trickle ({n} tasks one every {gap} s, each sharing its engine with steps placed "
        f"after it; {r['trickle_completed']} completed, `learnt` mode): GPU-seconds abs error "
        f"p50 {r['trickle_gpu_seconds_abs_error_p50']:.1%}, p90 "
        f"{r['trickle_gpu_seconds_abs_error_p90']:.1%}; queue wait p90 "
        f"{r['trickle_queue_wait_abs_error_p90_s']:.2f} s.",
    ]
