"""Workflows: which agent runs next, given a run's state.

A workflow answers two questions: which steps start a run, and what happens
when a step finishes (more steps, or the final output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .runs import RunState


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    role: str
    pool: str = "default"
    system_prompt: str = "You are a helpful assistant."
    max_tokens: int = 128
    temperature: float = 0.0


@dataclass(frozen=True, slots=True)
class StepPlan:
    """A step to dispatch: its id is unique within the run and deterministic."""

    step_id: str
    agent: str
    session: str


@dataclass(frozen=True, slots=True)
class Done:
    output: str


Next = list[StepPlan] | Done


class Workflow(Protocol):
    name: str
    agents: dict[str, Agent]

    def start(self, run: RunState) -> list[StepPlan]: ...

    def advance(self, run: RunState, finished: str) -> Next: ...


@dataclass
class ChatWorkflow:
    """One agent, multi-turn through ``session``."""

    name: str = "chat"
    agents: dict[str, Agent] = field(
        default_factory=lambda: {"assistant": Agent(name="assistant", role="assistant")}
    )

    def start(self, run: RunState) -> list[StepPlan]:
        return [StepPlan("s1", "assistant", run.session)]

    def advance(self, run: RunState, finished: str) -> Next:
        return Done(run.steps[finished].output)


def builtin_workflows() -> dict[str, Workflow]:
    return {"chat": ChatWorkflow()}
