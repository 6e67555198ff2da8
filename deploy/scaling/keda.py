"""KEDA's scaling of one pool: the ScaledObject's numbers and the replica
arithmetic of KEDA plus the HPA it drives (used by ``replay.py``).

* KEDA's prometheus scaler reads lag = waiting + in-flight jobs (the
  orchestrator's ``baton_consumer_pending_messages``) every
  ``pollingInterval``. From zero it activates one worker when lag >
  ``activationThreshold``; above zero the HPA wants ceil(lag / ``threshold``)
  replicas (10% tolerance, stabilisation windows and the first Pods policy
  of each direction, as configured in the YAML); with no activity for
  ``cooldownPeriod`` it scales to ``minReplicaCount``.
* The lag KEDA reads is ``signal_age`` seconds old at worst: the
  orchestrator reads the consumer every ``pending_poll_interval`` and
  Prometheus scrapes it every PodMonitor ``interval`` (the replay uses the
  worst case).
* A ``cron`` trigger (KEDA's cron scaler) holds ``desiredReplicas`` from
  ``start`` to ``end`` each day: a floor the HPA takes the larger of, and
  activity that keeps the pool from scaling to zero (``Floor``; the day
  replayed is a working day, so the day-of-week fields are not read).
* A second ``prometheus`` trigger on ``baton_pool_foreseen_steps`` (the
  steps the orchestrator foresees from the workflow graph) is the replay's
  announced demand: KEDA scales on the larger trigger.
* Simplification: the HPA is evaluated on KEDA's polling tick (not its own 15 s).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCALED_OBJECTS = ROOT / "deploy" / "k8s" / "components" / "autoscaling" / "scaledobjects.yaml"
POD_MONITOR = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "podmonitor.yaml"


@dataclass(frozen=True)
class Floor:
    """A cron trigger: ``replicas`` from ``start`` to ``end`` (seconds of the day)."""

    start: int
    end: int
    replicas: int

    def holds(self, now: int) -> bool:
        t = now % DAY
        if self.start <= self.end:
            return self.start <= t < self.end
        return not self.end <= t < self.start  # across midnight


DAY = 86_400


def cron_floor(meta: dict[str, str]) -> Floor:
    """KEDA's cron trigger metadata (``start``/``end`` as "M H * * *")."""

    def seconds(expr: str) -> int:
        minute, hour, *_ = expr.split()
        return int(hour) * 3600 + int(minute) * 60

    return Floor(seconds(meta["start"]), seconds(meta["end"]), int(meta["desiredReplicas"]))


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
    signal_age: int = 0  # seconds the lag read is behind the queue, at worst
    floors: tuple[Floor, ...] = ()  # cron triggers

    def floor(self, now: int) -> int:
        """The replicas held at ``now``: ``min_replicas`` or a cron trigger's."""
        return max([self.min_replicas] + [f.replicas for f in self.floors if f.holds(now)])


def signal_age(pod_monitor: Path = POD_MONITOR) -> int:
    """The orchestrator's pending poll plus Prometheus's scrape interval."""
    from services.orchestrator.settings import OrchestratorSettings

    poll = OrchestratorSettings.model_fields["pending_poll_interval"].default
    (doc,) = [d for d in yaml.safe_load_all(pod_monitor.read_text()) if d]
    scrape = max(int(str(e["interval"]).rstrip("s")) for e in doc["spec"]["podMetricsEndpoints"])
    return math.ceil(poll) + scrape


def load_policy(path: Path = SCALED_OBJECTS, name: str = "inference-worker") -> Policy:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    (spec,) = [d["spec"] for d in docs
               if d["kind"] == "ScaledObject" and d["metadata"]["name"] == name]  # fmt: skip
    # The backlog trigger; a foreseen-steps one is the replay's announced
    # demand (``prewarm``), cron ones are floors.
    (trigger,) = [t for t in spec["triggers"] if t["type"] == "prometheus"
                  and "baton_consumer_pending_messages" in t["metadata"]["query"]]  # fmt: skip
    meta = trigger["metadata"]
    floors = tuple(cron_floor(t["metadata"]) for t in spec["triggers"] if t["type"] == "cron")
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
        lag_threshold=int(meta["threshold"]),
        activation_lag_threshold=int(meta.get("activationThreshold", 0)),
        polling_interval=spec.get("pollingInterval", 30),
        cooldown_period=spec.get("cooldownPeriod", 300),
        up_window=up_window,
        down_window=down_window,
        up_policy=up_policy,
        down_policy=down_policy,
        signal_age=signal_age(),
        floors=floors,
    )


class Autoscaler:
    """KEDA activation plus the HPA's replica arithmetic."""

    def __init__(self, policy: Policy) -> None:
        self.p = policy
        self.last_active = -(10**9)
        self.recommendations: deque[tuple[int, int]] = deque()
        self.changes: list[tuple[int, int]] = []  # (time, +/- pods)

    def desired(self, now: int, lag: int, current: int) -> int:
        p = self.p
        floor = p.floor(now)
        if lag > p.activation_lag_threshold or floor > p.min_replicas:  # a cron trigger is active
            self.last_active = now
        if current == 0:
            return max(floor, 1) if now == self.last_active else floor
        if floor == 0 and now - self.last_active >= p.cooldown_period:
            return 0
        ratio = lag / (current * p.lag_threshold)
        raw = current if abs(ratio - 1) <= 0.1 else math.ceil(lag / p.lag_threshold)
        raw = min(max(raw, floor, 1), p.max_replicas)
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
