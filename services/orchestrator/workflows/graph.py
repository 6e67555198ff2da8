"""Runs a ``WorkflowSpec``: which steps start a run, what follows a step.

Pure: everything is derived from the run's recorded steps. A step instance id
is ``r<round>.<step>`` (or ``r<round>.<step>.<agent>`` inside a parallel
step), so the position in the graph needs no state of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from proto import keys
from proto.ids import is_valid_id

from ..state import RunState, StepState
from .spec import DONE, AgentSpec, InputSpec, StepSpec, WorkflowSpec


@dataclass(frozen=True, slots=True)
class StepPlan:
    """A step to dispatch: its id is unique within the run and deterministic."""

    step_id: str
    agent: str  # "" for an input step
    session: str
    input: InputSpec | None = None  # an input step: wait for a human's answer


@dataclass(frozen=True, slots=True)
class Done:
    output: str
    reason: str = "completed"  # or "round_limit"


Next = list[StepPlan] | Done


def parse_step_id(step_id: str) -> tuple[int, str, str | None]:
    """``r2.gather.coding`` -> (2, "gather", "coding")."""
    parts = step_id.split(".")
    return int(parts[0][1:]), parts[1], parts[2] if len(parts) > 2 else None


def is_step_id(text: str) -> bool:
    """Whether ``text`` is ``r<round>.<step>``: the id of a step outside a
    parallel one (as every input step is), e.g. named by a caller."""
    parts = text.split(".")
    return (
        len(parts) == 2
        and len(parts[0]) > 1
        and parts[0][0] == "r"
        and parts[0][1:].isdigit()
        and is_valid_id(parts[1])
    )


def route_choice(output: str, step: StepSpec) -> str:
    """The choice an answer names, or the route's default when it does not
    parse (deterministic fallback)."""
    assert step.route is not None
    text = output.strip()
    start, end = text.find("{"), text.rfind("}")
    try:
        value = json.loads(text[start : end + 1]).get(step.route.field) if start >= 0 else None
    except (ValueError, AttributeError):
        value = None
    return value if isinstance(value, str) and value in step.route.choices else step.route.default


class GraphWorkflow:
    def __init__(self, spec: WorkflowSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.agents: dict[str, AgentSpec] = spec.agents
        self._steps = {s.id: s for s in spec.steps}
        self._order = [s.id for s in spec.steps]

    def route_schema(self, step_id: str) -> str | None:
        """JSON schema (text) constraining a routing step's answer, if any."""
        _, sid, _ = parse_step_id(step_id)
        route = self._steps[sid].route
        if route is None:
            return None
        choice = {"type": "string", "enum": sorted(route.choices)}
        schema = {"type": "object", "properties": {route.field: choice}, "required": [route.field]}
        return json.dumps(schema)

    def input_spec(self, step_id: str) -> InputSpec | None:
        """The ``input`` of an input step (None for an agent's step)."""
        return self._steps[parse_step_id(step_id)[1]].input

    def _plans(self, round_: int, step: StepSpec, run: RunState) -> list[StepPlan]:
        if step.input is not None:
            return [StepPlan(f"r{round_}.{step.id}", "", run.session, step.input)]
        if step.agent is not None:
            return [StepPlan(f"r{round_}.{step.id}", step.agent, run.session)]
        # Parallel workers each work on a fork of the run's session.
        plans = []
        for a in step.parallel:
            step_id = f"r{round_}.{step.id}.{a}"
            plans.append(StepPlan(step_id, a, keys.fork_session(run.tenant, run.task_id, step_id)))
        return plans

    def fan_in(self, run: RunState, finished: str) -> list[tuple[str, StepState]]:
        """After a parallel step: (agent, its recorded step) of every branch,
        in the step's declared order (so the merged history renders the same
        way)."""
        round_, sid, _ = parse_step_id(finished)
        step = self._steps[sid]
        return [(a, run.steps[f"r{round_}.{sid}.{a}"]) for a in step.parallel]

    def start(self, run: RunState) -> list[StepPlan]:
        return self._plans(1, self.spec.steps[0], run)

    def position(self, step_id: str) -> tuple[int, int]:
        """Where a step instance stands in the run: (round, index of its step
        in the workflow). A run only ever moves forward in this order (a route
        back to an earlier step starts the next round), so the steps before a
        step are exactly those with a smaller position; the branches of a
        parallel step share one."""
        round_, sid, _ = parse_step_id(step_id)
        return round_, self._order.index(sid)

    def again(self, run: RunState, step_id: str) -> list[StepPlan]:
        """The plans that run ``step_id``'s step once more in ``run`` (a fork
        from it): the step, or every branch of its parallel step."""
        round_, sid, _ = parse_step_id(step_id)
        return self._plans(round_, self._steps[sid], run)

    def _output(self, run: RunState, fallback: str) -> str:
        if self.spec.output is None:
            return fallback
        done = [
            (k, s)
            for k, s in run.steps.items()
            if s.status == "done" and parse_step_id(k)[1] == self.spec.output
        ]
        return max(done, key=lambda kv: parse_step_id(kv[0])[0])[1].output if done else fallback

    def _following(self, step_id: str) -> tuple[int, StepSpec] | None:
        """The step that will follow ``step_id`` whatever it answers (its
        round and spec): ``step_id`` runs one agent (or asks a human) without
        a route and is not a parallel branch, and a step comes after it."""
        round_, sid, branch = parse_step_id(step_id)
        step = self._steps.get(sid)
        if branch is not None or step is None or step.route is not None:
            return None
        if step.agent is None and step.input is None:
            return None
        index = self._order.index(sid) + 1
        if index >= len(self._order):
            return None
        return round_, self._steps[self._order[index]]

    def foreseen(self, run: RunState, step_id: str) -> StepPlan | None:
        """The one model step that will follow ``step_id`` whatever it
        answers, before it answers (``_following``) when it runs one agent.
        None when what follows depends on the answer, fans out
        (``branches_after``), asks a human, ends the run or waits for other
        branches (``step_id`` is a parallel branch)."""
        following = self._following(step_id)
        if following is None:
            return None
        round_, nxt = following
        if nxt.agent is None:  # parallel or input
            return None
        return StepPlan(f"r{round_}.{nxt.id}", nxt.agent, run.session)

    def branches_after(self, run: RunState, step_id: str) -> list[StepPlan]:
        """The branches of the fan-out that will follow ``step_id`` whatever
        it answers (``_following`` is a parallel step), each on the fork of
        the run's session it will get; empty when no fan-out follows."""
        following = self._following(step_id)
        if following is None or not following[1].parallel:
            return []
        return self._plans(following[0], following[1], run)

    def advance(self, run: RunState, finished: str) -> Next:
        """What follows ``finished`` (which is recorded as done in ``run``).
        An empty list: wait (other branches of a parallel step still run)."""
        round_, sid, _ = parse_step_id(finished)
        step = self._steps[sid]
        if step.parallel:
            ids = [f"r{round_}.{sid}.{a}" for a in step.parallel]
            if any(run.steps.get(i) is None or run.steps[i].status != "done" for i in ids):
                return []
            # The fan-in continues from the answer recorded last (its ref covers all).
            last = max(ids, key=lambda i: run.steps[i].finished_at)
            output = run.steps[last].output
        else:
            output = run.steps[finished].output
        if step.route is not None:
            target = step.route.choices[route_choice(output, step)]
        else:
            index = self._order.index(sid) + 1
            target = self._order[index] if index < len(self._order) else DONE
        if target == DONE:
            return Done(self._output(run, output))
        if self._order.index(target) <= self._order.index(sid):
            round_ += 1
            if round_ > self.spec.rounds:
                return Done(self._output(run, output), reason="round_limit")
        return self._plans(round_, self._steps[target], run)
