"""The inference worker's Prometheus metrics (names in deploy/metrics.txt)."""

from __future__ import annotations

from functools import partial

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_timing = partial(Histogram, buckets=_LATENCY)  # a histogram of seconds

JOBS = Counter("baton_worker_jobs", "Inference jobs by outcome.", ["pool", "outcome"])
QUEUE_WAIT = _timing(
    "baton_worker_queue_wait_seconds",
    "From the job's publish to the start of its generation.",
    ["pool"],
)
TTFT = _timing(
    "baton_worker_ttft_seconds",
    "Time to first token: from the start of the generation (admitted) to its first token.",
    ["pool", "model"],
)
ITL = Histogram(
    "baton_worker_inter_token_latency_seconds",
    "Mean time between streamed tokens, one observation per generation (a token is a "
    "streamed chunk: one each for vllm and sim; vLLM's own per-token histogram is "
    "vllm:inter_token_latency_seconds).",
    ["pool", "model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
)
TOKEN_LAG = Histogram(
    "baton_worker_token_stream_lag_seconds",
    "From a token's generation to the publish of the delta that carries it (acked).",
    ["pool"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
JOB_LATENCY = _timing(
    "baton_worker_job_latency_seconds", "From the job's publish to its result.", ["pool"]
)
WARMS = Counter(
    "baton_worker_warms",
    "Pre-warm jobs (prefill of a step to come, nothing answered), by outcome: "
    "warmed, busy (no room at once: skipped), failed.",
    ["pool", "outcome"],
)
WARM_OUTCOMES = ("warmed", "busy", "failed")
PROMPT_TOKENS = Counter("baton_worker_prompt_tokens", "Prompt tokens processed.", ["pool"])
COMPLETION_TOKENS = Counter(
    "baton_worker_completion_tokens", "Completion tokens generated.", ["pool"]
)
KV_USAGE = Gauge("baton_worker_kv_usage_ratio", "Engine KV-cache usage (0..1).", ["pool", "worker"])
PREFIX_QUERIES = Counter(
    "baton_worker_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["pool"]
)
PREFIX_HITS = Counter(
    "baton_worker_prefix_cache_hits", "Prompt tokens served from the prefix cache.", ["pool"]
)
PREEMPTIONS = Counter("baton_worker_preemptions", "Engine preemptions.", ["pool"])
INFLIGHT = Gauge("baton_worker_inflight_jobs", "Jobs held by the worker.", ["pool", "worker"])
ADMITTED_TOKENS = Gauge(
    "baton_worker_admitted_tokens",
    "KV-cache tokens promised to admitted jobs (prompt + max_tokens).",
    ["pool", "worker"],
)
KV_CAPACITY = Gauge(
    "baton_worker_kv_capacity_tokens",
    "The engine's KV-cache capacity in tokens.",
    ["pool", "worker"],
)
OOM = Counter("baton_worker_oom", "Out-of-memory faults of the engine.", ["pool"])
ENGINE_RESTARTS = Counter("baton_worker_engine_restarts", "Engine restarts.", ["pool"])
READY = Gauge("baton_worker_ready", "1 when the engine is loaded and serving.", ["pool", "worker"])
JOB_OUTCOMES = (
    "completed",
    "nak",
    "oom",
    "engine_dead",
    "cancelled",
    "prompt_too_long",
    "superseded",
)


def init_series(pool: str, model: str) -> None:
    """Create every per-pool series at zero: an alert on increase() must see
    the first OOM, and a scrape must show every catalogued name."""
    for outcome in JOB_OUTCOMES:
        JOBS.labels(pool, outcome)
    for metric in (QUEUE_WAIT, JOB_LATENCY, PROMPT_TOKENS, COMPLETION_TOKENS, PREFIX_QUERIES,
                   PREFIX_HITS, PREEMPTIONS, OOM, ENGINE_RESTARTS, TOKEN_LAG):  # fmt: skip
        metric.labels(pool)
    TTFT.labels(pool, model)
    ITL.labels(pool, model)
    for outcome in WARM_OUTCOMES:
        WARMS.labels(pool, outcome)


GPU_MEMORY_USED = Gauge(
    "baton_worker_gpu_memory_used_bytes", "GPU memory in use (pynvml).", ["pool", "worker", "gpu"]
)
GPU_MEMORY_FREE = Gauge(
    "baton_worker_gpu_memory_free_bytes", "GPU memory free (pynvml).", ["pool", "worker", "gpu"]
)
