"""Seeded generator of a bursty multi-agent job trace (one day).

Tasks arrive as a Poisson process whose rate follows the working day (idle
nights), plus a few sudden bursts (a batch of tasks submitted at once). Each
task is a supervisor run: one planning job, 1-3 rounds of fan-out to 4-16
worker jobs, then one synthesis job. The trace is the inference-job arrival
times in seconds; it is open-loop (arrivals do not wait for completions).

    python deploy/scaling/bursty_trace.py   # rewrites deploy/scaling/trace.json
"""

from __future__ import annotations

import json
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


def task_jobs(rng: random.Random, start: float) -> list[float]:
    """Arrival times of one supervisor run's inference jobs."""
    jobs = [start]
    t = start + rng.uniform(3, 8)  # the plan comes back
    for _ in range(rng.randint(1, 3)):
        jobs += [t + rng.uniform(0, 0.5) for _ in range(rng.randint(4, 16))]
        t += rng.uniform(10, 25)  # the round's slowest worker answers
    jobs.append(t)
    return jobs


def generate(seed: int = SEED) -> list[float]:
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
    jobs = [j for s in starts for j in task_jobs(rng, s)]
    return sorted(round(j, 1) for j in jobs if j < DAY)


def save(jobs: list[float], path: Path = TRACE) -> None:
    doc = {
        "seed": SEED,
        "horizon_s": DAY,
        "generator": "deploy/scaling/bursty_trace.py",
        "jobs": jobs,
    }
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    jobs = generate()
    save(jobs)
    print(f"wrote {len(jobs)} jobs to {TRACE}")
