"""Replay a job trace against the worker ScaledObject's backlog policy.

The model, one-second steps:
* Jobs queue FIFO in the stream. A ready worker runs up to ``slots`` jobs at
  once (continuous batching), each for ``job_seconds``; its throughput is
  ``slots / job_seconds`` jobs/s.
* KEDA's nats-jetstream scaler reads lag = waiting + in-flight jobs every
  ``pollingInterval``. From zero it activates one worker when lag >
  ``activationLagThreshold``; above zero the HPA wants ceil(lag /
  ``lagThreshold``) replicas (10% tolerance, stabilisation windows and the
  first Pods policy of each direction, as configured in the YAML); with no
  activity for ``cooldownPeriod`` it scales to ``minReplicaCount``.
* A new worker holds its GPU from creation and takes jobs after
  ``cold_start`` seconds. A removed worker stops pulling, finishes its
  in-flight jobs (the SIGTERM drain), then frees the GPU.
Simplification: the HPA is evaluated on KEDA's polling tick (not its own 15 s).

    python deploy/scaling/sim.py [--cold-start 90] [--throughput 3.2]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCALED_OBJECTS = ROOT / "deploy" / "k8s" / "components" / "autoscaling" / "scaledobjects.yaml"
TRACE = Path(__file__).with_name("trace.json")  # written by bursty_trace.py
DRAIN_LIMIT = 7200  # seconds past the horizon before leftover jobs count as unserved


def load_trace(path: Path = TRACE) -> tuple[list[float], int]:
    doc = json.loads(path.read_text())
    return doc["jobs"], doc["horizon_s"]


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    lag_threshold: int
    activation_lag_threshold: int
    polling_interval: int
    cooldown_period: int
    up_window: int = 0
    down_window: int = 300
    up_policy: tuple[int, int] | None = None  # (pods, period seconds)
    down_policy: tuple[int, int] | None = None


def load_policy(path: Path = SCALED_OBJECTS, name: str = "inference-worker") -> Policy:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    (spec,) = [d["spec"] for d in docs if d["metadata"]["name"] == name]
    meta = spec["triggers"][0]["metadata"]
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
    behavior = behavior.get("behavior", {})

    def rules(direction: str, default_window: int) -> tuple[int, tuple[int, int] | None]:
        b = behavior.get(direction, {})
        pods = [p for p in b.get("policies", []) if p["type"] == "Pods"]
        first = (pods[0]["value"], pods[0]["periodSeconds"]) if pods else None
        return b.get("stabilizationWindowSeconds", default_window), first

    up_window, up_policy = rules("scaleUp", 0)
    down_window, down_policy = rules("scaleDown", 300)
    return Policy(
        min_replicas=spec.get("minReplicaCount", 0),
        max_replicas=spec.get("maxReplicaCount", 100),
        lag_threshold=int(meta["lagThreshold"]),
        activation_lag_threshold=int(meta.get("activationLagThreshold", 0)),
        polling_interval=spec.get("pollingInterval", 30),
        cooldown_period=spec.get("cooldownPeriod", 300),
        up_window=up_window,
        down_window=down_window,
        up_policy=up_policy,
        down_policy=down_policy,
    )


@dataclass
class Worker:
    started: int
    ready_at: int
    busy: list[int] = field(default_factory=list)  # finish times
    leaving: bool = False


@dataclass
class Result:
    gpu_seconds: float
    waits: list[float]
    peak_workers: int
    timeline: list[int]  # GPU-holding workers, sampled each minute
    unserved: int = 0

    def p95_wait(self) -> float:
        return percentile(self.waits, 0.95)

    def summary(self) -> dict:
        w = self.waits
        return {
            "gpu_seconds": round(self.gpu_seconds, 1),
            "jobs": len(w),
            "p95_queue_wait_s": round(self.p95_wait(), 2),
            "p50_queue_wait_s": round(percentile(w, 0.5), 2),
            "max_queue_wait_s": round(max(w, default=0.0), 2),
            "peak_workers": self.peak_workers,
            "unserved_jobs": self.unserved,
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class Autoscaler:
    """KEDA activation plus the HPA's replica arithmetic."""

    def __init__(self, policy: Policy) -> None:
        self.p = policy
        self.last_active = -(10**9)
        self.recommendations: deque[tuple[int, int]] = deque()
        self.changes: list[tuple[int, int]] = []  # (time, +/- pods)

    def desired(self, now: int, lag: int, current: int) -> int:
        p = self.p
        if lag > p.activation_lag_threshold:
            self.last_active = now
        if current == 0:
            return max(p.min_replicas, 1) if now == self.last_active else p.min_replicas
        if p.min_replicas == 0 and now - self.last_active >= p.cooldown_period:
            return 0
        ratio = lag / (current * p.lag_threshold)
        raw = current if abs(ratio - 1) <= 0.1 else math.ceil(lag / p.lag_threshold)
        raw = min(max(raw, max(p.min_replicas, 1)), p.max_replicas)
        self.recommendations.append((now, raw))
        horizon = max(p.up_window, p.down_window)
        while self.recommendations[0][0] < now - horizon:
            self.recommendations.popleft()
        up = min(r for t, r in self.recommendations if t >= now - p.up_window)
        down = max(r for t, r in self.recommendations if t >= now - p.down_window)
        target = up if up > current else min(down, current)
        return current + self._limit(now, target - current)

    def _limit(self, now: int, delta: int) -> int:
        rule = self.p.up_policy if delta > 0 else self.p.down_policy
        if rule and delta:
            pods, period = rule
            used = sum(
                abs(d) for t, d in self.changes if t > now - period and (d > 0) == (delta > 0)
            )
            delta = max(0, min(abs(delta), pods - used)) * (1 if delta > 0 else -1)
        if delta:
            self.changes.append((now, delta))
        return delta


def simulate(
    arrivals: list[float],
    horizon: int,
    policy: Policy,
    *,
    cold_start: int = 90,
    throughput: float = 3.2,
    job_seconds: int = 10,
    always_on: int | None = None,
) -> Result:
    """Run the trace; ``always_on=N`` keeps N warm workers and never scales."""
    slots = max(1, round(throughput * job_seconds))
    workers = [Worker(started=0, ready_at=0) for _ in range(always_on or 0)]
    scaler = Autoscaler(policy)
    queue: deque[float] = deque()
    waits: list[float] = []
    gpu_seconds, peak, timeline, i, t = 0.0, len(workers), [], 0, 0
    while t < horizon or (t < horizon + DRAIN_LIMIT and (queue or any(w.busy for w in workers))):
        while i < len(arrivals) and arrivals[i] <= t:
            queue.append(arrivals[i])
            i += 1
        for w in workers:
            w.busy = [f for f in w.busy if f > t]
        for w in [w for w in workers if w.leaving and not w.busy]:
            gpu_seconds += t - w.started
            workers.remove(w)
        for w in workers:
            if w.leaving or t < w.ready_at:
                continue
            while queue and len(w.busy) < slots:
                waits.append(t - queue.popleft())
                w.busy.append(t + job_seconds)
        if always_on is None and t % policy.polling_interval == 0:
            lag = len(queue) + sum(len(w.busy) for w in workers)
            staying = [w for w in workers if not w.leaving]
            change = scaler.desired(t, lag, len(staying)) - len(staying)
            workers += [Worker(started=t, ready_at=t + cold_start) for _ in range(change)]
            # Kubernetes removes not-ready pods first, then the least busy.
            by_cost = sorted(staying, key=lambda w: (w.ready_at <= t, len(w.busy)))
            for w in by_cost[: max(0, -change)]:
                w.leaving = True
        peak = max(peak, len(workers))
        if t % 60 == 0:
            timeline.append(len(workers))
        t += 1
    gpu_seconds += sum(t - w.started for w in workers)
    unserved = len(queue) + len(arrivals) - i
    return Result(gpu_seconds, waits, peak, timeline, unserved)


def plot(arrivals: list[float], horizon: int, scaled: Result, always_on: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = horizon // 60
    per_minute = [0] * minutes
    for a in arrivals:
        per_minute[min(minutes - 1, int(a // 60))] += 1
    hours = [m / 60 for m in range(minutes)]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 5.5))
    top.bar(hours, per_minute, width=1 / 60, color="tab:gray")
    top.set_ylabel("jobs / minute")
    top.set_title("Bursty multi-agent trace vs KEDA backlog scaling (deploy/scaling/sim.py)")
    line = scaled.timeline[:minutes]
    bottom.step(hours[: len(line)], line, where="post", label="scale to zero (KEDA)")
    bottom.axhline(always_on, color="tab:red", linestyle="--", label=f"always on ({always_on})")
    bottom.set_ylabel("GPU workers")
    bottom.set_xlabel("hour of day")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--cold-start", type=int, default=90, help="seconds until a new worker is ready"
    )
    ap.add_argument("--throughput", type=float, default=3.2, help="jobs/s one worker sustains")
    ap.add_argument("--job-seconds", type=int, default=10, help="service time of one job")
    ap.add_argument("--always-on", type=int, help="warm workers to compare (default: max replicas)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "scaling.png")
    args = ap.parse_args(argv)

    arrivals, horizon = load_trace()
    policy = load_policy()
    always_on = args.always_on or policy.max_replicas
    knobs = {"cold_start": args.cold_start, "throughput": args.throughput}
    knobs["job_seconds"] = args.job_seconds
    scaled = simulate(arrivals, horizon, policy, **knobs)
    warm = simulate(arrivals, horizon, policy, always_on=always_on, **knobs)
    # Alternatives worth knowing: one warm worker plus scaling, one worker only.
    floor = simulate(arrivals, horizon, replace(policy, min_replicas=1), **knobs)
    single = simulate(arrivals, horizon, policy, always_on=1, **knobs)
    report = {
        "trace": {"file": "deploy/scaling/trace.json", "jobs": len(arrivals), "horizon_s": horizon},
        "policy": vars(policy),
        "model": knobs,
        "scale_to_zero": scaled.summary(),
        "always_on": {"workers": always_on, **warm.summary()},
        "gpu_seconds_fraction_of_always_on": round(scaled.gpu_seconds / warm.gpu_seconds, 4),
        "alternatives": {
            "min_replicas_1": floor.summary(),
            "always_on_1": single.summary(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        try:
            plot(arrivals, horizon, scaled, always_on, args.plot)
        except ImportError:
            print("matplotlib not installed: no plot")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
