"""The orchestrator's Prometheus metrics (names in deploy/metrics.txt)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from prometheus_client import Counter, Gauge, Histogram

from proto.messages import PHASES

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_timing = partial(Histogram, buckets=_LATENCY)  # a histogram of seconds

TASKS = Counter("baton_tasks", "Tasks by workflow and outcome.", ["workflow", "outcome"])
TASK_LATENCY = _timing(
    "baton_task_latency_seconds", "From acceptance to the terminal event.", ["workflow"]
)
STEP_LATENCY = _timing(
    "baton_step_latency_seconds", "From dispatch to result, per step.", ["workflow", "agent"]
)
STEP_PHASE = _timing(
    "baton_step_phase_seconds",
    "Seconds a finished step spent in each phase of its waterfall (queue, context, admission, "
    "prefill, decode, tool, record; a phase it did not go through is not observed).",
    ["phase", "workflow", "pool"],
)
# Each replica counts the runs it wrote last (inflight.py): sum over replicas.
STEPS_IN_FLIGHT = Gauge(
    "baton_steps_in_flight",
    "Steps dispatched and not yet finished, in the runs this replica stored last.",
)
BUDGET_STOPS = Counter("baton_budget_stops", "Tasks stopped by their budget.", ["workflow"])
RUN_CONFLICTS = Counter(
    "baton_run_write_conflicts",
    "Compare-and-set writes of a run's state that lost (another replica or a parallel branch "
    "of the same run wrote first): the run is read again and decided again.",
    ["workflow"],
)
TOKENS = Counter(
    "baton_tokens", "Tokens by workflow, agent and kind.", ["workflow", "agent", "kind"]
)
COST = Counter("baton_cost_usd", "Cost in USD by workflow and agent.", ["workflow", "agent"])
TENANT_COST = Counter(
    "baton_tenant_cost_usd",
    "Cost in USD by tenant: its steps (as baton_cost_usd) and their pre-warms.",
    ["tenant"],
)
GPU_SECONDS = Counter(
    "baton_gpu_seconds", "GPU-seconds by workflow and agent.", ["workflow", "agent"]
)
ROUTING = Counter("baton_routing_decisions", "Where steps were sent.", ["decision"])
RESUMED = Counter("baton_runs_resumed", "Runs picked up again after a crash or redelivery.")
REJECTED = Counter("baton_rejected_tasks", "Tasks refused at intake, by error code.", ["code"])
INPUT_ANSWERS = Counter(
    "baton_input_answers",
    "Answers to input steps by outcome (taken, already_answered, not_waiting, finished, ...).",
    ["outcome"],
)
INPUT_OUTCOMES = (
    "taken", "default", "already_answered", "not_waiting", "finished", "unknown_task",
    "forbidden", "input_too_large", "invalid_field", "bad_encoding",
)  # fmt: skip
DRIFT_FIGURES = ("kv_tokens", "max_seqs", "max_model_len", "prefill_tps", "decode_tps")
TASK_OUTCOMES = ("completed", "failed", "rejected", "budget_exceeded", "cancelled")
REJECTIONS = ("bad_encoding", "too_deep", "missing_field", "invalid_field", "input_too_large",
              "forbidden", "unknown_workflow", "rate_limited",
              "tenant_suspended")  # proto/submission.py  # fmt: skip


def init_series(workflows: dict[str, dict[str, str]], tenants: Iterable[str]) -> None:
    """Create per-workflow, per-agent and per-tenant series at zero
    (``workflows``: {workflow: {agent: pool}})."""
    for tenant in tenants:
        TENANT_COST.labels(tenant)
    for wf, agents in workflows.items():
        for outcome in TASK_OUTCOMES:
            TASKS.labels(wf, outcome)
        TASK_LATENCY.labels(wf)
        BUDGET_STOPS.labels(wf)
        RUN_CONFLICTS.labels(wf)
        for phase in PHASES:
            for pool in sorted(set(agents.values())):
                STEP_PHASE.labels(phase, wf, pool)
        for pool in sorted(set(agents.values())):
            for figure in DRIFT_FIGURES:
                CATALOGUE_DRIFT.labels(pool, figure)
            for measure in ("gpu_seconds", "queue_wait_s"):
                PREDICTION_ERROR.labels(measure, pool)
            WAITING_CAPACITY.labels(pool)
        for agent in agents:
            STEP_LATENCY.labels(wf, agent)
            COST.labels(wf, agent)
            GPU_SECONDS.labels(wf, agent)
            for kind in ("prompt", "completion"):
                TOKENS.labels(wf, agent, kind)
    for decision in ("warm", "pool"):
        ROUTING.labels(decision)
    for outcome in ("sent", "kept", "in_flight", "no_worker", "pressure"):  # prewarm.COUNTED
        PREWARMS.labels(outcome)
    for outcome in INPUT_OUTCOMES:
        INPUT_ANSWERS.labels(outcome)
    for code in REJECTIONS:
        REJECTED.labels(code)


PENDING = Gauge(
    "baton_consumer_pending_messages",
    "Messages waiting for or held by a consumer (the scaling signal).",
    ["stream", "consumer"],
)
HEARTBEAT_AGE = Gauge(
    "baton_worker_heartbeat_age_seconds",
    "Seconds since each worker's last heartbeat.",
    ["pool", "worker"],
)
CATALOGUE_DRIFT = Counter(
    "baton_pool_catalogue_drift",
    "Catalogue figures a worker measured more than 50% away (once per worker and figure).",
    ["pool", "figure"],
)
POOL_DECISIONS = Counter(
    "baton_pool_decisions",
    "Model steps placed on a pool, by pool chosen and why (scheduling.Reason).",
    ["chosen", "reason"],
)
WAITING_CAPACITY = Counter(
    "baton_steps_waiting_capacity",
    "Model steps placed on a pool with no ready worker (scaled to zero or loading).",
    ["pool"],
)
PREWARMS = Counter(
    "baton_prewarms",
    "Pre-warms of the step that follows a running one: sent, kept (sent again "
    "across an input wait), or why not (in_flight, no_worker, pressure).",
    ["outcome"],
)
PREDICTION_ERROR = Histogram(
    "baton_step_prediction_error",
    "A finished step against its prediction: measure=gpu_seconds is the relative "
    "error (actual / predicted - 1), measure=queue_wait_s the seconds waited minus predicted.",
    ["measure", "pool"],
    buckets=(-10, -3, -1, -0.5, -0.2, -0.1, 0, 0.1, 0.2, 0.5, 1, 3, 10, 30, 100),
)
