"""Which scaling policy for a bursty day of multi-agent tasks: a simulator.

Replays the seeded day in ``trace.json`` (``bursty_trace.py``), closed-loop
per task (``replay.py``), against six policies:

1. ``always_on``: one pool of the large GPU, always on, sized to the peak
   (the ScaledObject's ``maxReplicaCount``);
2. ``scale_to_zero``: the same pool under today's ScaledObject
   (deploy/k8s/components/autoscaling/scaledobjects.yaml);
3. ``two_pools``: a small cheap pool and the large dear one
   (``pools.yaml``), each step placed by the orchestrator's scheduler
   (``predict``/``choose`` of services/orchestrator/scheduling.py) on the
   cheapest pool whose predicted completion meets its latency target,
   spilling over when that pool is saturated or cold;
4. ``two_pools_no_spill``: the same, always the cheapest pool that fits;
5. ``two_pools_prewarm``: 3 plus pre-warming from the workflow graph;
6. ``two_pools_day_floor``: 3 with the large pool's ``day_floor`` (one
   worker at night, five over the working day: a KEDA cron trigger, the
   kustomize component deploy/k8s/components/day-floor);

and two alternatives, to see what a warm floor buys:
``two_pools_prewarm_floor``, 5 with one worker of each pool always up
(``minReplicaCount: 1``); ``two_pools_day_floor_prewarm``, 6 with
pre-warming as modelled.

For each: GPU-seconds, cost, task latency, job queue wait, time to first
token, steps that missed their target, failed and unserved steps; and the
issue's two goals, met or missed. Writes ``bench/results/scaling.json`` and
``docs/scaling-policies.png``; ``make bench`` runs it too.

    python deploy/scaling/sim.py [--always-on N] [--out FILE] [--plot FILE] [--other-days N]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
if sys.path[0] != str(ROOT):  # this checkout's services/, also when run as a script
    sys.path.insert(0, str(ROOT))

from deploy.scaling.keda import Policy, cron_floor, load_policy  # noqa: E402
from deploy.scaling.replay import (  # noqa: E402
    Job,
    Pool,
    Replayed,
    Scenario,
    load_trace,
    percentile,
    replay,
)
from services.orchestrator.pools import PoolSpec, parse_catalogue  # noqa: E402

POOLS = Path(__file__).with_name("pools.yaml")
RULES = ROOT / "deploy" / "prometheus" / "rules" / "baton.rules.yml"
OUT = ROOT / "bench" / "results" / "scaling.json"
PLOT = ROOT / "docs" / "scaling-policies.png"
GOAL_COST_FRACTION = 0.6
GOAL_WAIT_OVER_COLD_S = 10.0


def load_pools(path: Path = POOLS) -> dict[str, Any]:
    """The catalogue, each pool's KEDA policy, the targets, preference and single pool."""
    doc = yaml.safe_load(path.read_text())
    specs = parse_catalogue(doc)
    base = load_policy()
    policies = {
        name: replace(
            base,
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            lag_threshold=int(doc["keda"][name]["threshold"]),
        )
        for name, spec in specs.items()
    }
    ordered = [specs[n] for n in doc["preference"]]
    floors = {n: day_floor(policies[n], patched(path.parent / rel))
              for n, rel in doc["day_floor"].items()}  # fmt: skip
    return {"specs": ordered, "policies": policies, "targets_s": doc["targets_s"],
            "single": specs[doc["single"]], "day_floor": floors}  # fmt: skip


def patched(patch: Path) -> dict[str, Any]:
    """The ScaledObject fields a kustomize JSON patch sets: ``minReplicaCount``
    and the triggers it appends."""
    fields: dict[str, Any] = {"triggers": []}
    for op in yaml.safe_load(patch.read_text()):
        if op["op"] == "replace" and op["path"] == "/spec/minReplicaCount":
            fields["minReplicaCount"] = op["value"]
        elif op["op"] == "add" and op["path"] == "/spec/triggers/-":
            fields["triggers"].append(op["value"])
        else:
            raise ValueError(f"{patch}: the replay does not model {op['op']} {op['path']}")
    return fields


def day_floor(policy: Policy, scaled_object: dict[str, Any]) -> Policy:
    """``policy`` with a ScaledObject's ``minReplicaCount`` and its cron triggers."""
    crons = [t["metadata"] for t in scaled_object.get("triggers", []) if t["type"] == "cron"]
    return replace(
        policy,
        min_replicas=int(scaled_object.get("minReplicaCount", policy.min_replicas)),
        floors=policy.floors + tuple(cron_floor(m) for m in crons),
    )


def task_slo_s(path: Path = RULES) -> float:
    """The task-latency SLO the alerts use (``baton:slo_task_latency_p95_seconds``)."""
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("record") == "baton:slo_task_latency_p95_seconds":
                found = re.fullmatch(r"vector\((\d+(?:\.\d+)?)\)", rule["expr"].strip())
                if found:
                    return float(found.group(1))
    raise LookupError(f"no task-latency SLO in {path}")


def scenarios(pools: dict[str, Any], today: Policy, always_on: int) -> list[Scenario]:
    single: PoolSpec = pools["single"]
    targets = pools["targets_s"]
    two = tuple(Pool(s, pools["policies"][s.name]) for s in pools["specs"])
    floor = tuple(replace(p, policy=replace(p.policy, min_replicas=1)) for p in two)
    day = tuple(replace(p, policy=pools["day_floor"].get(p.spec.name, p.policy)) for p in two)
    return [
        Scenario("always_on", (Pool(single, always_on=always_on),), targets),
        Scenario("scale_to_zero", (Pool(single, today),), targets),
        Scenario("two_pools", two, targets),
        Scenario("two_pools_no_spill", two, targets, spill=False),
        Scenario("two_pools_prewarm", two, targets, prewarm=True),
        Scenario("two_pools_prewarm_floor", floor, targets, prewarm=True),
        Scenario("two_pools_day_floor", day, targets),
        Scenario("two_pools_day_floor_prewarm", day, targets, prewarm=True),
    ]


def _pct(values: list[float], q: float) -> float:
    return round(percentile(values, q), 1)


def summary(o: Replayed, slo_s: float) -> dict[str, Any]:
    """Per-policy figures (times in seconds, money in USD)."""
    done = [s for s in o.steps if not math.isnan(s.finished)]
    started = [s for s in o.steps if not math.isnan(s.started)]
    waits = [s.started - s.released for s in started]
    follow = [s.ttft for j, s in zip(o.jobs, o.steps, strict=True)
              if j.phase > 0 and not math.isnan(s.started)]  # fmt: skip
    targets = o.scenario.targets_s
    missed = sum(
        1
        for j, s in zip(o.jobs, o.steps, strict=True)
        if not math.isnan(s.finished) and s.finished - s.released > targets[j.kind]
    )
    failed = sum(1 for s in o.steps if s.reason == "too_long")
    errors = [abs((s.finished - s.released) - s.predicted_s) / max(1.0, s.finished - s.released)
              for s in done]  # fmt: skip
    latency = list(o.task_latency.values())
    pools: dict[str, dict[str, Any]] = {}
    for name, run in o.pools.items():
        placed = [s for s in o.steps if s.pool == name]
        reasons: dict[str, int] = {}
        for s in placed:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        pools[name] = {
            "gpu_seconds": round(run.gpu_seconds),
            "cost_usd": round(run.gpu_seconds / 3600 * run.spec.usd_per_gpu_hour, 2),
            "peak_workers": run.peak,
            "steps": len(placed),
            "reasons": dict(sorted(reasons.items())),
            "woken_by_announced_steps": run.woken_by_demand,
        }
    warmed = [s.prefill_saved_s for s in o.steps if s.prewarmed]
    return {
        "gpu_seconds": sum(p["gpu_seconds"] for p in pools.values()),
        "cost_usd": round(sum(p["cost_usd"] for p in pools.values()), 2),
        "tasks": len(o.task_latency) + len(o.failed_tasks),
        "tasks_completed": len(o.task_latency),
        "p50_task_latency_s": _pct(latency, 0.5),
        "p95_task_latency_s": _pct(latency, 0.95),
        "max_task_latency_s": _pct(latency, 1.0),
        "tasks_over_slo": sum(1 for x in latency if x > slo_s),
        "steps": len(o.steps),
        "p50_queue_wait_s": _pct(waits, 0.5),
        "p95_queue_wait_s": _pct(waits, 0.95),
        "max_queue_wait_s": _pct(waits, 1.0),
        "p50_next_step_ttft_s": _pct(follow, 0.5),
        "p95_next_step_ttft_s": _pct(follow, 0.95),
        "cold_waits": sum(1 for s in o.steps if s.cold),
        "missed_target_steps": missed,
        "failed_steps": failed,
        "unserved_steps": len(o.steps) - len(done) - failed,
        "prediction_error_p50": round(percentile(errors, 0.5), 3),
        "prediction_error_p90": round(percentile(errors, 0.9), 3),
        "prewarmed_steps": len(warmed),
        "prewarm_prefill_saved_s_p50": round(percentile(warmed, 0.5), 2),
        "pools": pools,
    }


def cost_goal(results: dict[str, dict], name: str) -> dict[str, Any]:
    """Policy ``name`` against always-on: at most 60 % of its cost, p95 no worse."""
    warm, two = results["always_on"], results[name]
    fraction = round(two["cost_usd"] / warm["cost_usd"], 4)
    return {
        "goal": f"{LABELS[name]} at <= {GOAL_COST_FRACTION:.0%} of always-on's cost "
        "at equal or better p95 task latency",
        "policy": name,
        "cost_fraction_of_always_on": fraction,
        "p95_task_latency_s": {
            name: two["p95_task_latency_s"],
            "always_on": warm["p95_task_latency_s"],
        },
        "met": fraction <= GOAL_COST_FRACTION
        and two["p95_task_latency_s"] <= warm["p95_task_latency_s"],
        # Where the steps ran: a "two-pool" policy whose cheap pool serves
        # nothing saves by its schedule, not by the second pool.
        "steps_by_pool": {p: v["steps"] for p, v in two.get("pools", {}).items()},
    }


def goals(results: dict[str, dict], cold_start_s: float) -> dict[str, Any]:
    zero = results["scale_to_zero"]
    wait_limit = cold_start_s + GOAL_WAIT_OVER_COLD_S
    return {
        "two_pools_cost": cost_goal(results, "two_pools"),
        "two_pools_day_floor_cost": cost_goal(results, "two_pools_day_floor"),
        "scale_to_zero_wait": {
            "goal": f"scale to zero at a p95 queue wait <= cold start + "
            f"{GOAL_WAIT_OVER_COLD_S:.0f} s, zero failed steps",
            "p95_queue_wait_s": zero["p95_queue_wait_s"],
            "limit_s": wait_limit,
            "failed_steps": zero["failed_steps"] + zero["unserved_steps"],
            "met": zero["p95_queue_wait_s"] <= wait_limit
            and zero["failed_steps"] + zero["unserved_steps"] == 0,
        },
    }


def replay_all(always_on: int | None = None) -> dict[str, Replayed]:
    """Every policy over the shipped trace."""
    jobs, horizon = load_trace()
    today = load_policy()
    n = always_on or today.max_replicas
    return {sc.name: replay(jobs, horizon, sc) for sc in scenarios(load_pools(), today, n)}


def other_days(seeds: list[int], policy: str = "two_pools_day_floor") -> list[dict[str, Any]]:
    """``policy`` against always-on on days of other seeds (``bursty_trace``):
    whether a floor sized on the shipped day holds on days it was not sized on."""
    from deploy.scaling import bursty_trace

    today = load_policy()
    by_name = {sc.name: sc for sc in scenarios(load_pools(), today, today.max_replicas)}
    slo = task_slo_s()
    out = []
    for seed in seeds:
        rows = bursty_trace.generate(seed)
        jobs = [Job(i, **{c: r[c] for c in bursty_trace.COLUMNS}) for i, r in enumerate(rows)]
        warm = summary(replay(jobs, bursty_trace.DAY, by_name["always_on"]), slo)
        mine = summary(replay(jobs, bursty_trace.DAY, by_name[policy]), slo)
        results = {"always_on": warm, policy: mine}
        out.append({"seed": seed, "tasks": warm["tasks"], **cost_goal(results, policy)})
    return out


def run_all(always_on: int | None = None, plot_to: Path | None = PLOT) -> dict[str, Any]:
    outcomes = replay_all(always_on)
    some = next(iter(outcomes.values()))
    jobs, horizon = some.jobs, some.horizon
    pools = load_pools()
    today = load_policy()
    n = outcomes["always_on"].scenario.pools[0].always_on
    slo = task_slo_s()
    results = {name: summary(o, slo) for name, o in outcomes.items()}
    single: PoolSpec = pools["single"]
    for r in results.values():
        r["cost_fraction_of_always_on"] = round(r["cost_usd"] / results["always_on"]["cost_usd"], 4)
    report = {
        "simulator": "deploy/scaling/sim.py (a model, not a measurement)",
        "trace": _trace_facts(jobs, horizon, min(s.max_model_len for s in pools["specs"])),
        "pools": {s.name: _spec(s) for s in pools["specs"]},
        "single_pool": single.name,
        "always_on_workers": n,
        "keda": {name: vars(p) for name, p in pools["policies"].items()},
        "keda_today": vars(today),
        "day_floor": {name: asdict(p) for name, p in pools["day_floor"].items()},
        "targets_s": pools["targets_s"],
        "task_slo_s": slo,
        "policies": results,
        "goals": goals(results, single.cold_start_s),
    }
    if plot_to is not None:
        try:
            plot(jobs, horizon, outcomes, results, plot_to)
        except ImportError:
            print("matplotlib not installed: no plot")
    return report


def _trace_facts(jobs: list[Job], horizon: int, smallest_context: int) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for j in jobs:
        kinds[j.kind] = kinds.get(j.kind, 0) + 1
    long = [j for j in jobs if j.kv > smallest_context]
    return {"file": "deploy/scaling/trace.json", "horizon_s": horizon, "jobs": len(jobs),
            "tasks": len({j.task for j in jobs}), "kinds": kinds,
            "steps_only_the_large_pool_holds": len(long),
            "tasks_with_such_a_step": len({j.task for j in long})}  # fmt: skip


def _spec(s: PoolSpec) -> dict[str, Any]:
    return {k: getattr(s, k) for k in ("model", "max_model_len", "kv_tokens", "max_seqs",
            "prefill_tps", "decode_tps", "usd_per_gpu_hour", "cold_start_s")}  # fmt: skip


LABELS = {
    "always_on": "1. one pool, always on",
    "scale_to_zero": "2. one pool, scale to zero (KEDA today)",
    "two_pools": "3. two pools, choose + spill-over",
    "two_pools_no_spill": "4. two pools, cheapest that fits",
    "two_pools_prewarm": "5. two pools, spill-over + pre-warm",
    "two_pools_prewarm_floor": "alternative: 5 + one warm worker per pool",
    "two_pools_day_floor": "6. 3 + large day floor (1 at night, 5 at 07:45-20:00)",
    "two_pools_day_floor_prewarm": "alternative: 6 + pre-warm",
}


def markdown(report: dict[str, Any]) -> str:
    """The policy table for docs/benchmarks.md."""
    pools, trace = report["pools"], report["trace"]
    lines = [
        "## Scaling policies (simulated)",
        "",
        "`python deploy/scaling/sim.py` (also run by `make bench`): one seeded day of "
        f"{trace['tasks']} supervisor tasks ({trace['jobs']} steps; "
        f"{trace['steps_only_the_large_pool_holds']} of them, in {trace['tasks_with_such_a_step']} "
        "tasks, too long for the small pool) replayed against each policy; a model with "
        "estimated GPU figures, not a measurement. Pools: "
        + "; ".join(_pool_line(n, p) for n, p in pools.items())
        + f". Always on: {report['always_on_workers']} x `{report['single_pool']}`. "
        "Targets: " + ", ".join(f"{k} {v} s" for k, v in report["targets_s"].items()) + ".",
        "",
        "| policy | GPU-s | cost | vs always-on | task p50 / p95 | queue wait p50 / p95 | "
        f"next-step TTFT p50 / p95 | tasks over {report['task_slo_s']:g} s | missed target | "
        "failed / unserved |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["policies"].items():
        lines.append(
            f"| {LABELS.get(name, name)} | {r['gpu_seconds']:,} | ${r['cost_usd']:,.2f} | "
            f"{r['cost_fraction_of_always_on']:.1%} | {r['p50_task_latency_s']:g} / "
            f"{r['p95_task_latency_s']:g} s | {r['p50_queue_wait_s']:g} / "
            f"{r['p95_queue_wait_s']:g} s | "
            f"{r['p50_next_step_ttft_s']:g} / {r['p95_next_step_ttft_s']:g} s | "
            f"{r['tasks_over_slo']} | "
            f"{r['missed_target_steps']} | {r['failed_steps']} / {r['unserved_steps']} |"
        )
    lines.append("")
    for g in report["goals"].values():
        lines.append(f"* Goal {g['goal']}: **{'met' if g['met'] else 'missed'}** "
                     f"({_goal_figures(g)}).")  # fmt: skip
    why = "[deploy.md](deploy.md#scaling-policies-simulated)"
    lines += ["", f"What is modelled, why the figures come out so and the KEDA settings: {why}."]
    return "\n".join(lines)


def _pool_line(name: str, p: dict[str, Any]) -> str:
    return (f"`{name}` {p['max_model_len'] // 1024}k context, {p['prefill_tps']:g}/"
            f"{p['decode_tps']:g} tok/s prefill/decode per sequence, "
            f"${p['usd_per_gpu_hour']:g}/GPU-h, {p['cold_start_s']:g} s cold start")  # fmt: skip


def _goal_figures(g: dict[str, Any]) -> str:
    if "cost_fraction_of_always_on" in g:
        p95 = g["p95_task_latency_s"]
        by_pool = ", ".join(f"{n} on {p}" for p, n in g.get("steps_by_pool", {}).items())
        return (f"{g['cost_fraction_of_always_on']:.1%} of the cost, p95 task latency "
                f"{p95[g['policy']]:g} s vs {p95['always_on']:g} s; steps: {by_pool}")  # fmt: skip
    return (f"p95 wait {g['p95_queue_wait_s']:g} s vs a limit of {g['limit_s']:g} s, "
            f"{g['failed_steps']} failed or unserved")  # fmt: skip


def plot(
    jobs: list[Job],
    horizon: int,
    outcomes: dict[str, Replayed],
    results: dict[str, dict],
    out: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(3, 2, width_ratios=[2.2, 1], hspace=0.12, wspace=0.25)
    arrivals = fig.add_subplot(grid[0, 0])
    one = fig.add_subplot(grid[1, 0], sharex=arrivals)
    two = fig.add_subplot(grid[2, 0], sharex=arrivals)
    cost = fig.add_subplot(grid[:, 1])
    minutes = horizon // 60
    per_minute = [0] * minutes
    for j in jobs:
        per_minute[min(minutes - 1, int(j.at // 60))] += 1
    hours = [m / 60 for m in range(minutes)]
    arrivals.bar(hours, per_minute, width=1 / 60, color="tab:gray")
    arrivals.set_ylabel("steps / minute\n(open loop)")
    arrivals.set_title("One bursty day replayed against each policy (deploy/scaling/sim.py)")
    shown = [
        (one, "always_on", "large", "tab:red", "--"),
        (one, "scale_to_zero", "large", "tab:blue", "-"),
        (two, "two_pools", "small", "tab:green", "-"),
        (two, "two_pools", "large", "tab:orange", "-"),
        (two, "two_pools_day_floor", "large", "tab:purple", "--"),
    ]
    for ax, name, pool, color, style in shown:
        line = outcomes[name].pools[pool].timeline[:minutes]
        ax.step(hours[: len(line)], line, where="post", color=color, linestyle=style,
                label=f"{LABELS[name]}: {pool}", linewidth=1)  # fmt: skip
    for ax in (one, two):
        ax.set_ylabel("GPU workers")
        ax.legend(loc="upper left", fontsize=8)
    for ax in (arrivals, one):
        ax.tick_params(labelbottom=False)
    two.set_xlabel("hour of day")
    two.set_xlim(0, 24)
    for name, r in results.items():
        cost.scatter(r["p95_task_latency_s"], r["cost_usd"], s=50, label=LABELS.get(name, name))
    cost.set_yscale("log")
    cost.set_xlabel("p95 task latency (s)")
    cost.set_ylabel("cost of the day (USD, log scale)")
    cost.set_title("cost vs p95 task latency")
    cost.grid(True, which="both", alpha=0.3)
    cost.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--always-on", type=int, help="large workers always on (default: max replicas)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--other-days", type=int, metavar="N", default=0,
                    help="also replay the day floor against always-on on seeds 1..N "
                    "(the shipped day is one seed; about 2 s a seed)")  # fmt: skip
    args = ap.parse_args(argv)
    report = run_all(args.always_on, args.plot)
    if args.other_days:
        report["other_days"] = other_days(list(range(1, args.other_days + 1)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    for day in report.get("other_days", []):
        p95 = day["p95_task_latency_s"]
        print(f"seed {day['seed']}: {day['tasks']} tasks, {day['cost_fraction_of_always_on']:.1%} "
              f"of the cost, p95 {p95[day['policy']]:g} s vs {p95['always_on']:g} s: "
              f"{'met' if day['met'] else 'missed'}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
