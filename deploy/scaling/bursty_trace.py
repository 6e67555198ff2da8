"""Seeded generator of a bursty multi-agent job trace (one day).

Tasks arrive as a Poisson process whose rate follows the working day (idle
nights), plus a few sudden bursts (a batch of tasks submitted at once). Each
task is a supervisor run: one planning job (phase 0), 1-3 rounds of fan-out
to 4-16 worker jobs (phases 1..R), then one synthesis job (phase R+1).

Each job carries what a scheduling policy needs: its task, kind and phase
(the workflow graph: a phase starts when the one before it has finished),
its prompt tokens, the part of the prompt known before its phase starts
(``prefix``: what pre-warming could prefill), ``max_tokens``, the output the
scheduler expects (the agent's usual) and the output it really produces.
About one worker job in ten reads a long document (12k-60k tokens) and the
synthesis of a wide run holds every worker's answer: the long-context steps
only a large pool can hold.

``at`` is the open-loop arrival time (the job arrives as if nothing waited:
the plan takes 3-8 s, a round 10-25 s); the replay in ``sim.py`` is
closed-loop per task and uses only the task's start, the phases and each
job's ``offset`` (the fan-out's dispatch spread). The arrival times are
drawn from ``random.Random(SEED)`` exactly as before the sizes were added;
the sizes come from a second stream so that they did not move them.

    python deploy/scaling/bursty_trace.py   # rewrites deploy/scaling/trace.json
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

TRACE = Path(__file__).with_name("trace.json")
SEED = 6
DAY = 86_400
# Tasks per hour for each hour of the day.
HOURLY_RATE = [0, 0, 0, 0.5, 0, 0, 0, 1, 5, 12, 15, 15, 8, 12, 15, 15, 12, 6, 2, 1, 0.5, 0, 0, 0.5]
BURSTS = 4  # sudden batches during working hours
BURST_TASKS = (20, 50)
BURST_SPREAD_S = 90

COLUMNS = ["task", "kind", "phase", "at", "offset", "prompt", "prefix", "max_tokens",
           "expected", "output"]  # fmt: skip
# Token sizes per kind (an 8B-class model's tokenizer; system prompts fixed).
PLAN_SYSTEM, WORKER_SYSTEM, SYNTH_SYSTEM = 800, 600, 800
BRIEF = (200, 2_000)  # the user's task as submitted
SUBTASK = (100, 300)  # the plan's instruction to one worker
RETRIEVED = (1_000, 4_000)  # documents a worker reads
LONG_DOC, LONG_DOC_TOKENS = 0.1, (12_000, 60_000)
MAX_TOKENS = {"plan": 1_024, "worker": 768, "synthesis": 2_048}
EXPECTED = {"plan": 400, "worker": 350, "synthesis": 900}


def task_times(rng: random.Random, start: float) -> list[tuple[int, float, float]]:
    """``(phase, open-loop arrival, offset in its phase)`` of one run's jobs."""
    jobs = [(0, start, 0.0)]
    t = start + rng.uniform(3, 8)  # the plan comes back
    rounds = rng.randint(1, 3)
    for r in range(1, rounds + 1):
        offsets = [rng.uniform(0, 0.5) for _ in range(rng.randint(4, 16))]
        jobs += [(r, t + o, o) for o in offsets]
        t += rng.uniform(10, 25)  # the round's slowest worker answers
    jobs.append((rounds + 1, t, 0.0))
    return jobs


def task_sizes(rng: random.Random, phases: list[int]) -> list[dict]:
    """Kind and token sizes of one run's jobs, for the phases ``task_times`` drew."""
    brief = rng.randint(*BRIEF)
    plan_out = rng.randint(200, 700)
    out = [_job("plan", PLAN_SYSTEM + brief, 0, plan_out)]
    answers: list[int] = []
    for _ in phases[1:-1]:
        span = LONG_DOC_TOKENS if rng.random() < LONG_DOC else RETRIEVED
        prompt = WORKER_SYSTEM + brief + rng.randint(*SUBTASK) + rng.randint(*span)
        answer = min(MAX_TOKENS["worker"], round(rng.lognormvariate(math.log(350), 0.4)))
        answers.append(answer)
        out.append(_job("worker", prompt, WORKER_SYSTEM + brief, answer))
    prompt = SYNTH_SYSTEM + brief + plan_out + sum(answers)
    # Every answer but the last to come back can be appended to a warmed prefix.
    out.append(_job("synthesis", prompt, prompt - answers[-1], rng.randint(500, 1_500)))
    return [job | {"phase": phase} for job, phase in zip(out, phases, strict=True)]


def _job(kind: str, prompt: int, prefix: int, output: int) -> dict:
    return {"kind": kind, "prompt": prompt, "prefix": prefix, "max_tokens": MAX_TOKENS[kind],
            "expected": EXPECTED[kind], "output": output}  # fmt: skip


def generate(seed: int = SEED) -> list[dict]:
    """The day's jobs (dicts keyed by ``COLUMNS``) in arrival order; task ids
    in order of the tasks' starts."""
    rng = random.Random(seed)
    starts: list[float] = []
    for hour, rate in enumerate(HOURLY_RATE):
        t = hour * 3600.0
        while rate > 0:
            t += rng.expovariate(rate / 3600)
            if t >= (hour + 1) * 3600:
                break
            starts.append(t)
    for _ in range(BURSTS):
        at = rng.uniform(9 * 3600, 18 * 3600)
        starts += [at + rng.uniform(0, BURST_SPREAD_S) for _ in range(rng.randint(*BURST_TASKS))]
    sizes = random.Random(f"sizes-{seed}")
    tasks = []
    for s in starts:
        times = task_times(rng, s)
        sized = task_sizes(sizes, [phase for phase, _, _ in times])
        jobs = [j | {"at": round(at, 1), "offset": round(o, 1)}
                for (_, at, o), j in zip(times, sized, strict=True)]  # fmt: skip
        tasks.append((s, jobs))
    tasks.sort(key=lambda t: t[0])
    jobs = [j | {"task": i} for i, (_, js) in enumerate(tasks) for j in js]
    return sorted(jobs, key=lambda j: (j["at"], j["task"], j["phase"]))


def save(jobs: list[dict], path: Path = TRACE) -> None:
    """One job a line, as a row of ``COLUMNS`` (readable diffs, small file)."""
    head = {"seed": SEED, "horizon_s": DAY, "generator": "deploy/scaling/bursty_trace.py",
            "columns": COLUMNS}  # fmt: skip
    rows = ",\n".join(json.dumps([j[c] for c in COLUMNS], separators=(",", ":")) for j in jobs)
    text = json.dumps(head, separators=(",", ":"))[:-1] + ',"jobs":[\n' + rows + "\n]}\n"
    path.write_text(text)


if __name__ == "__main__":
    jobs = generate()
    save(jobs)
    print(f"wrote {len(jobs)} jobs to {TRACE}")
