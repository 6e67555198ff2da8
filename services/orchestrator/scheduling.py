"""Where a model step runs: predict its KV-cache need, wait, run time and cost on
each pool that may serve it, and pick the cheapest that meets its target.

Pure (no clock, no I/O): given the step's need, the pool catalogue
(``pools.py``) and what the pools' heartbeats and backlog say now
(``PoolNow``), it answers a ``Decision`` with every ``Prediction`` it weighed,
to be published on the step's events. The model of a pool (fits, sharing,
wait, run, GPU-seconds, cost): docs/scheduling.md, "The prediction"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .batching import Overlap, decode_speed, expected_arrivals, overlap, queue_wait, share
from .pools import PoolSpec

Reason = Literal[
    "only",  # one pool named: nothing to weigh
    "cheapest",  # the cheapest pool meeting the target (or no target)
    "spill_saturated",  # the cheaper pools would miss the target behind their backlog
    "spill_cold",  # the cheaper pools are at zero: their cold start misses the target
    "fastest",  # no pool meets the target: the one that finishes first
    "largest",  # no pool holds the whole window: the largest, whose worker cuts it
    "moved",  # a worker found the prompt too long: the step moved to a larger pool
    "too_long",  # no pool holds even the step's shortest window
]


@dataclass(frozen=True, slots=True)
class StepNeed:
    """What a step asks of an engine."""

    prompt_tokens: int  # the window plus the offered tools, as the engine counts them
    max_tokens: int
    # Tokens it will likely generate (<= max_tokens): run time, GPU-seconds
    # and cost are predicted from it; KV cache and fits from ``max_tokens``.
    expected_output: int
    # Prompt tokens already prefilled on the pool (a pre-warmed prefix): set
    # per pool by the caller; they take KV cache but no prefill time.
    cached_tokens: int = 0
    # The shortest prompt the step can run with (its system prompt, offered
    # tools and newest message: a worker cuts older turns to fit); 0 = the
    # whole prompt.
    floor_tokens: int = 0
    learnt: bool = False  # expected_output learnt from the agent's answers

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class PoolNow:
    """A pool as its heartbeats and backlog show it now."""

    ready: int = 0  # workers ready to take jobs
    starting: int = 0  # workers up but still loading their engine
    running: int = 0  # sequences running on its ready workers
    backlog: int = 0  # jobs waiting in the pool's queue
    # Seconds until the first starting worker is ready (None: a whole cold start).
    ready_in_s: float | None = None
    # Measured by its workers (None: the catalogue's figure stands); decode
    # is a sequence's speed alone on the engine when the slowdown is known.
    prefill_tps: float | None = None
    decode_tps: float | None = None
    decode_slowdown: float = 0.0  # per other sequence in the batch (batching.SlowdownFit)
    prefill_slowdown: float = 0.0  # the same, of a sequence's prefill
    # A prefill's cost by its tokens (``batching.PrefillFit``): ``fixed_s`` +
    # ``per_token_s`` x tokens, fitted from steps alone, and the prompt
    # tokens of each other sequence sharing the engine that the step's run
    # holds (the pool's typical prompt, as far as the engine runs the
    # batch's prefills one after the other); None: by speed (``prefill_tps``
    # slowed by the batch, as above).
    prefill_by_tokens: tuple[float, float, float] | None = None
    # Steps known to follow this one (tasks taken or waiting in the task
    # stream, not placed yet): they will share the engine with it.
    arriving: int = 0
    # Seconds from now until each sequence this replica placed on the pool
    # and has no answer for is predicted to end, ascending.
    frees_in: tuple[float, ...] = ()
    # When each of those runs, ``(begin, end)`` in seconds from now (begin
    # after now: queued): the step is predicted to share the engine only
    # while they overlap it (``batching.overlap``). Empty: every sequence
    # counted is taken to share the whole of its run.
    spans: tuple[tuple[float, float], ...] = ()
    # Steps per second joining the pool's running batches lately
    # (``batching.arrival_rate``): the step expects as many to join it
    # while it runs (with ``spans`` only). 0: none foreseen.
    arrival_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class Prediction:
    pool: str
    kv_tokens: int
    fits: bool  # the whole window and max_tokens within the pool's context
    cold: bool  # no ready worker: the step waits for one to start
    wait_s: float
    run_s: float
    gpu_seconds: float
    cost_usd: float
    # The step's shortest window fits (the worker would cut older turns).
    fits_floor: bool = True
    max_model_len: int = 0
    output_tokens: int = 0  # the answer length run time was predicted with
    learnt: bool = False  # ...learnt from the agent's answers (else max_tokens)

    @property
    def done_s(self) -> float:
        return self.wait_s + self.run_s


@dataclass(frozen=True, slots=True)
class Decision:
    pool: str | None  # None: no pool holds the step (``too_long``)
    reason: Reason
    predictions: tuple[Prediction, ...]

    @property
    def chosen(self) -> Prediction | None:
        return next((p for p in self.predictions if p.pool == self.pool), None)


def predict(need: StepNeed, spec: PoolSpec, now: PoolNow) -> Prediction:
    """The step on ``spec`` as it is ``now``."""
    prefill = now.prefill_tps or spec.prefill_tps
    decode = now.decode_tps or spec.decode_tps
    # A window longer than the pool holds is cut by its worker to fit.
    prompt = min(need.prompt_tokens, max(need.floor_tokens, spec.max_model_len - need.max_tokens))
    uncached = max(0, prompt - need.cached_tokens)
    # A worker runs as many sequences as it has slots and KV cache for.
    per_worker = max(1, min(spec.max_seqs, spec.kv_tokens // max(1, prompt + need.max_tokens)))
    cold = now.ready == 0
    # The workers that will serve the queue (the starting ones when none is ready).
    workers = now.ready or max(1, now.starting)
    ahead = now.running + now.backlog
    # The sequences whose run this replica predicted share the step's engine
    # only while they overlap it; the rest (another replica's, those known
    # to follow) all along.
    unknown = max(0, ahead - len(now.spans))
    shared = share(per_worker, unknown / workers, now.arriving / workers)

    # By tokens: the step's prefill costs the engine ``fixed + per_token x
    # its tokens``, and each of the n - 1 sequences sharing its engine
    # brings a prefill (``typical`` tokens) run while the step is on the
    # engine: its run holds them all, and the clock splits them equally
    # ("What GPU-seconds means").
    by_tokens = now.prefill_by_tokens

    def run_with(n: float) -> float:
        if by_tokens is not None:
            fixed, per_token, typical = by_tokens
            first = fixed + per_token * (uncached + max(0.0, n - 1.0) * typical)
        else:
            first = uncached / decode_speed(prefill, now.prefill_slowdown, n)
        return first + need.expected_output / decode_speed(decode, now.decode_slowdown, n)

    wait_s = 0.0
    if cold:
        # To be woken by the backlog: one cold start; already starting: the rest of one.
        wait_s = spec.cold_start_s
        if now.starting > 0 and now.ready_in_s is not None:
            wait_s = min(wait_s, max(0.0, now.ready_in_s))
    # The sequences ahead run in full batches.
    wait_s += queue_wait(per_worker * workers, ahead, run_with(per_worker), now.frees_in)
    if now.spans or now.arrival_rate > 0:
        # Decode slows with the batch: the run at the batch it meets, then
        # at the mean batch over that run (twice: it settles).
        def over(run: float) -> Overlap:
            joining = expected_arrivals(now.arrival_rate, wait_s, run, per_worker * workers)
            return overlap(wait_s, run, now.spans + joining, slots=per_worker, workers=workers,
                           company=shared.concurrency)  # fmt: skip

        met = over(run_with(shared.concurrency)).mean_concurrency
        run_s = run_with(over(run_with(met)).mean_concurrency)
        gpu_seconds = over(run_s).gpu_seconds
    else:
        run_s = run_with(shared.concurrency)
        gpu_seconds = run_s / shared.concurrency
    return Prediction(
        pool=spec.name,
        kv_tokens=need.kv_tokens,
        fits=need.kv_tokens <= spec.max_model_len,
        cold=cold,
        wait_s=wait_s,
        run_s=run_s,
        gpu_seconds=gpu_seconds,
        cost_usd=gpu_seconds / 3600.0 * spec.usd_per_gpu_hour,
        fits_floor=(need.floor_tokens or need.prompt_tokens) + need.max_tokens
        <= spec.max_model_len,
        max_model_len=spec.max_model_len,
        output_tokens=need.expected_output,
        learnt=need.learnt,
    )


def choose(predictions: list[Prediction], target_s: float | None) -> Decision:
    """The cheapest fitting pool whose predicted completion meets
    ``target_s`` (any, without a target); when none meets it, the one that
    finishes first. ``predictions`` in the agent's order of preference,
    which breaks ties in cost."""
    preds = tuple(predictions)
    fitting = [p for p in preds if p.fits]
    if not fitting:
        cut = [p for p in preds if p.fits_floor]
        if not cut:
            return Decision(None, "too_long", preds)
        # Nothing holds the whole window: the pool that keeps the most of it.
        largest = max(cut, key=lambda p: (p.max_model_len, -p.cost_usd))
        return Decision(largest.pool, "only" if len(preds) == 1 else "largest", preds)
    if len(preds) == 1:
        return Decision(fitting[0].pool, "only", preds)
    by_cost = sorted(fitting, key=lambda p: p.cost_usd)  # stable: the agent's order breaks ties
    meets = [p for p in by_cost if target_s is None or p.done_s <= target_s]
    if not meets:
        fastest = min(fitting, key=lambda p: p.done_s)
        return Decision(fastest.pool, "fastest", preds)
    best = meets[0]
    skipped = by_cost[: by_cost.index(best)]
    if not skipped:
        return Decision(best.pool, "cheapest", preds)
    reason: Reason = "spill_cold" if all(p.cold for p in skipped) else "spill_saturated"
    return Decision(best.pool, reason, preds)
