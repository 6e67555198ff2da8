"""What the run console draws for one task, as plain data. Pure: the run
state, its workflow, its events and ``now`` in; JSON-ready dicts out (the
page only lays them out), so every picture is unit-tested without a browser.
The waterfall's rows and phases: docs/console.md, "Pages"."""

from __future__ import annotations

from typing import Any

from proto.messages import PHASES

from ..state import RunState, StepState
from ..workflows import GraphWorkflow, WorkflowSpec

TOOL_LAYER = "tool"


def _order(wf: GraphWorkflow, step_id: str) -> tuple[int, int, str]:
    try:
        return (*wf.position(step_id), step_id)
    except (ValueError, IndexError):  # a step of a workflow changed since: last
        return (1 << 30, 0, step_id)


def _phases(st: StepState, start: float, end: float) -> tuple[list[dict[str, Any]], bool]:
    """The step's bars (relative to ``start``) and whether they were measured."""
    measured = st.timing.phases if st.timing is not None else None
    if measured is None or measured.total() <= 0.0:
        return [{"name": "run", "start": 0.0, "seconds": round(max(0.0, end - start), 6)}], False
    at, bars = 0.0, []
    for name in PHASES:
        seconds = float(getattr(measured, name))
        if seconds > 0:
            bars.append({"name": name, "start": round(at, 6), "seconds": round(seconds, 6)})
            at += seconds
    return bars, True


def _step(
    run: RunState, step_id: str, st: StepState, started: float, now: float, t0: float
) -> dict[str, Any]:
    queued = st.timing.queued_at if st.timing is not None else 0.0
    start = queued or started or st.dispatched_at
    running = st.status in ("dispatched", "tools", "waiting_input") and not run.terminal
    end = st.finished_at or (now if running else run.updated_at)
    bars, measured = _phases(st, start, max(start, end))
    if st.carried:  # it ran in the task this one was forked from: not on this run's clock
        start = end = t0
        bars, measured = [], False
    failed = st.status == "failed"
    calls = [
        {"key": key, "tool": c.tool, "start": round(c.dispatched_at - t0, 6),
         "seconds": round(c.seconds if c.status == "done" else max(0.0, now - c.dispatched_at), 6),
         "status": c.status, "outcome": c.outcome,
         "layer": TOOL_LAYER if c.status == "done" and c.outcome != "ok" else None}
        for key, c in st.calls.items()
        if not st.carried
    ]  # fmt: skip
    return {
        "id": step_id,
        "agent": st.agent or "input",
        "status": st.status,
        "running": running,
        "carried": st.carried,
        "input": st.input,
        "worker": st.worker,
        "attempt": st.attempt,
        "start": round(start - t0, 6),
        "end": round(max(start, end) - t0, 6),
        "phases": bars,
        "measured": measured,
        "calls": calls,
        "prompt_tokens": st.usage.prompt_tokens,
        "completion_tokens": st.usage.completion_tokens,
        "gpu_seconds": round(st.usage.gpu_seconds, 6),
        "cost_usd": st.cost_usd,
        "context": _where(st),
        "failed": failed,
        "layer": run.error.layer if failed and run.error is not None else None,
        "code": run.error.code if failed and run.error is not None else None,
        "output": st.output[:2000],
        "answered_by": st.answered_by,
    }


def _where(st: StepState) -> dict[str, Any] | None:
    """Where the step's context is: session and version (not the signed ref)."""
    return (
        None if st.origin is None else {"session": st.origin.session, "version": st.origin.version}
    )


def graph_view(spec: WorkflowSpec, run: RunState) -> dict[str, Any]:
    """The workflow's steps and edges, with the path this run took: each
    step's instances (``r<round>...``) and their statuses."""
    taken: dict[str, list[dict[str, str]]] = {s.id: [] for s in spec.steps}
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    for step_id, st in run.steps.items():
        sid = step_id.split(".")[1] if "." in step_id else step_id
        if sid in taken:
            taken[sid].append({"id": step_id, "status": st.status})
    for i, s in enumerate(spec.steps):
        kind = "input" if s.input else "parallel" if s.parallel else "agent"
        agents = s.parallel or ([s.agent] if s.agent else [])
        nodes.append({"id": s.id, "kind": kind, "agents": agents,
                      "runs": sorted(taken[s.id], key=lambda r: r["id"])})  # fmt: skip
        if s.route is not None:
            for value, target in s.route.choices.items():
                edges.append({"from": s.id, "to": target, "label": value,
                              "back": target != "done" and _index(spec, target) <= i})  # fmt: skip
        else:
            target = spec.steps[i + 1].id if i + 1 < len(spec.steps) else "done"
            edges.append({"from": s.id, "to": target, "label": "", "back": False})
    rounds = max((int(k.split(".")[0][1:]) for k in run.steps), default=0)
    return {"nodes": nodes, "edges": edges, "rounds": rounds, "max_rounds": spec.rounds}


def _index(spec: WorkflowSpec, step_id: str) -> int:
    return next(i for i, s in enumerate(spec.steps) if s.id == step_id)


def task_view(
    run: RunState, spec: WorkflowSpec | None, events: list[dict[str, Any]], now: float
) -> dict[str, Any]:
    """Everything the task page draws. ``events``: the task's events as
    JSON (``started`` times of steps recorded without timing fields come
    from them); ``spec`` None: a workflow this orchestrator no longer has
    (the steps are drawn, the graph is not)."""
    started = {
        e["step"]: e["ts"]
        for e in events
        if e.get("type") == "step" and e.get("status") == "started" and not e.get("call")
    }
    t0 = run.created_at or min((s.dispatched_at for s in run.steps.values()), default=now)
    wf = GraphWorkflow(spec) if spec is not None else None
    ids = sorted(run.steps, key=lambda k: _order(wf, k)) if wf else sorted(run.steps)
    steps = [_step(run, k, run.steps[k], started.get(k, 0.0), now, t0) for k in ids]
    agents: list[str] = []
    for s in steps:
        if s["agent"] not in agents:
            agents.append(s["agent"])
    error = None
    if run.error is not None:
        error = {"code": run.error.code, "message": run.error.message, "layer": run.error.layer}
    tool_failures = [c for s in steps for c in s["calls"] if c["layer"]]
    waiting = next(({"step": s["id"], "deadline": run.steps[s["id"]].deadline}
                    for s in steps if s["status"] == "waiting_input"), None)  # fmt: skip
    if waiting is not None and wf is not None:
        ask = wf.input_spec(waiting["step"])
        waiting["prompt"] = ask.prompt if ask is not None else ""
    ends = [s["end"] for s in steps]
    ends += [c["start"] + c["seconds"] for s in steps for c in s["calls"]]
    span = max([0.0, *ends])
    return {
        "task_id": run.task_id,
        "tenant": run.tenant,
        "workflow": run.workflow,
        "session": run.session,
        "status": run.status,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "forked_from": run.forked_from,
        "forked_at": run.forked_at,
        "output": run.output,
        "error": error,
        # Where it broke: the run's error layer; else a failed tool call's.
        "failed_layer": error["layer"] if error else (TOOL_LAYER if tool_failures else None),
        "usage": {
            "prompt_tokens": run.usage.prompt_tokens,
            "completion_tokens": run.usage.completion_tokens,
            "gpu_seconds": round(run.usage.gpu_seconds, 6),
        },
        "cost_usd": run.cost_usd,
        "span": round(span, 6),
        "agents": agents,
        "steps": steps,
        "graph": graph_view(spec, run) if spec is not None else None,
        "waiting": waiting,
        "phases": list(PHASES),
    }
