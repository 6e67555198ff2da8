"""Workflow files: validation with the line at fault, and the graph's moves
(sequence, fan-out/fan-in, routing with a fallback, the round limit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.orchestrator.state import RunState, StepState
from services.orchestrator.workflows import Done, GraphWorkflow, WorkflowError, load_dir, parse
from services.orchestrator.workflows.graph import is_step_id, route_choice

BUILTIN = Path(__file__).parents[1] / "services" / "orchestrator" / "workflows"

GOOD = """\
name: demo
agents:
  a: {role: r, system: s}
steps:
  - id: one
    agent: a
"""


def test_the_builtin_workflows_load() -> None:
    specs = load_dir(BUILTIN)
    assert {"chat", "research"} <= set(specs)
    research = specs["research"]
    assert research.rounds == 3 and [s.id for s in research.steps][:2] == ["plan", "gather"]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (GOOD.replace("agent: a", "agent: nobody"), 6, "unknown agent 'nobody'"),
        (GOOD.replace("{role: r, system: s}", "{role: r, system: s, max_tokens: lots}"), 3, "Expected `int`"),
        (GOOD.replace("  - id: one\n", "  - id: one\n    colour: red\n"), 5, "colour"),
        (GOOD + "  - id: one\n    agent: a\n", 7, "duplicate step id"),
        (GOOD.replace("name: demo", "name: bad.name"), 1, "name must match"),
        (GOOD + "  - id: two\n    agent: a\n    route: {choices: {x: nowhere}, default: x}\n", 9, "unknown step 'nowhere'"),
        (GOOD.replace("agents:", "agents: [oops"), 3, "while parsing a flow sequence"),
        (GOOD.replace("    agent: a\n", "    agent: a\n    parallel: [a]\n"), 5, "exactly one of"),
    ],
)  # fmt: skip
def test_an_invalid_workflow_is_rejected_with_the_line_at_fault(
    text: str, line: int, fragment: str
) -> None:
    with pytest.raises(WorkflowError) as info:
        parse(text, "demo.yaml")
    assert info.value.line == line, str(info.value)
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"demo.yaml:{line}:")


def _run(**steps: StepState) -> RunState:
    return RunState(tenant="t", task_id="x", session="s", workflow="research", task_seq=1,
                    steps=dict(steps))  # fmt: skip


def _done(agent: str, output: str = "ok", at: float = 1.0) -> StepState:
    return StepState(agent=agent, pool="default", session="s", status="done", output=output,
                     finished_at=at)  # fmt: skip


def test_research_fans_out_waits_for_both_branches_and_routes() -> None:
    wf = GraphWorkflow(load_dir(BUILTIN)["research"])
    [plan] = wf.start(_run())
    assert plan.step_id == "r1.plan" and plan.agent == "supervisor"
    run = _run(**{"r1.plan": _done("supervisor")})
    fan = wf.advance(run, "r1.plan")
    assert isinstance(fan, list) and {p.step_id for p in fan} == {
        "r1.gather.retrieval",
        "r1.gather.coding",
    }
    run.steps["r1.gather.retrieval"] = _done("retrieval")
    assert wf.advance(run, "r1.gather.retrieval") == []  # coding still runs: wait
    run.steps["r1.gather.coding"] = _done("coding", at=2.0)
    [check] = wf.advance(run, "r1.gather.coding")  # type: ignore[misc]
    assert check.step_id == "r1.validate"
    run.steps["r1.validate"] = _done("validation", '{"next": "revise"}')
    [again] = wf.advance(run, "r1.validate")  # type: ignore[misc]
    assert again.step_id == "r2.plan"  # a new round
    run.steps["r2.validate"] = _done("validation", 'I think {"next": "accept"} is right')
    [summary] = wf.advance(run, "r2.validate")  # type: ignore[misc]
    assert summary.step_id == "r2.summarize"
    run.steps["r2.summarize"] = _done("supervisor", "final words")
    assert wf.advance(run, "r2.summarize") == Done("final words")


def test_the_round_limit_ends_a_loop_that_never_converges() -> None:
    wf = GraphWorkflow(load_dir(BUILTIN)["research"])
    run = _run(**{"r3.validate": _done("validation", '{"next": "revise"}')})
    result = wf.advance(run, "r3.validate")
    assert isinstance(result, Done) and result.reason == "round_limit"


@pytest.mark.parametrize(
    ("answer", "choice"),
    [('{"next": "revise"}', "revise"), ("no json at all", "accept"), ('{"next": "maybe"}', "accept"),
     ('{"next": 3}', "accept"), ("{broken", "accept")],
)  # fmt: skip
def test_a_route_falls_back_to_its_default_when_the_answer_does_not_parse(
    answer: str, choice: str
) -> None:
    step = load_dir(BUILTIN)["research"].steps[2]
    assert route_choice(answer, step) == choice


TOOLED = """\
name: tooled
agents:
  helper:
    role: helper
    system: help
    model: big
    tools: [search, python, mcp.calc.add]
    max_tool_calls: 4
    tool_choice: required
steps:
  - id: go
    agent: helper
"""


def test_agents_declare_tools_a_choice_a_limit_and_a_model_pool() -> None:
    spec = parse(TOOLED, "tooled.yaml", frozenset({"calc"}))
    a = spec.agents["helper"]
    assert (a.tools, a.max_tool_calls, a.tool_choice, a.pool) == (
        ["search", "python", "mcp.calc.add"],
        4,
        "required",
        "big",
    )


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        ("tools: [search, python, mcp.calc.add]", 7, "names MCP server 'calc'"),
        ("tools: [search, shell]", 7, "unknown tool 'shell'"),
        ("tool_choice: required", 9, "tool_choice must be one of"),
    ],
)
def test_a_bad_tool_declaration_is_rejected_at_load_with_its_line(
    change: str, line: int, message: str
) -> None:
    text = TOOLED
    if "shell" in change:
        text = text.replace("tools: [search, python, mcp.calc.add]", change)
    if change.startswith("tool_choice"):
        text = text.replace(change, "tool_choice: sometimes")
    with pytest.raises(WorkflowError) as err:
        servers = frozenset({"calc"}) if change.startswith("tool_choice") else frozenset()
        parse(text, "tooled.yaml", servers)
    assert err.value.line == line and message in err.value.message
    assert str(err.value).startswith(f"tooled.yaml:{line}:")


def test_a_caller_names_a_step_by_its_round_and_id() -> None:
    assert is_step_id("r1.confirm") and is_step_id("r12.detail")
    for bad in ("confirm", "r.confirm", "x1.confirm", "r1x.confirm", "r1.", "r1.a b",
                "r1.gather.coding"):  # fmt: skip
        assert not is_step_id(bad), bad
