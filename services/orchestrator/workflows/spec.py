"""Workflow files: the schema, and errors that name the line at fault. What a
workflow's steps, routes, rounds and input steps mean: docs/workflows.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import yaml

from proto.ids import ID_PATTERN, is_valid_id
from proto.sizes import MAX_INPUT_BYTES, MAX_OUTPUT_TOKENS
from proto.tools import TOOL_CHOICES, check_tool_name

DONE = "done"


class AgentSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: str
    system: str
    pool: str = "default"
    model: str | None = None  # the model pool its steps run on (another name for `pool`)
    max_tokens: int = 128
    temperature: float = 0.0
    timeout: float = 0.0  # seconds a step may wait for its answer; 0 = the default
    tools: list[str] = []  # search, python, mcp.<server>.<tool>
    max_tool_calls: int = 8  # per step; past it the model must answer in text
    tool_choice: str = "auto"  # auto | required | none
    tool_pool: str = "default"  # the tool worker pool its calls go to
    # Pools its steps may run on, in order of preference (pools serving one
    # model family): each step goes to the cheapest that holds its KV cache and
    # meets latency_target (docs/scheduling.md). Empty: `pool` alone.
    pools: list[str] = []
    latency_target: float | None = None  # seconds from dispatch to answer, if any

    def __post_init__(self) -> None:
        if self.model is not None:
            self.pool = self.model
        if self.pools:
            self.pool = self.pools[0]

    @property
    def eligible(self) -> tuple[str, ...]:
        """The pools a step of this agent may run on."""
        return tuple(self.pools) or (self.pool,)


class RouteSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    choices: dict[str, str]  # answer value -> step id or "done"
    default: str  # a key of choices, taken when the answer does not parse
    field: str = "next"


class InputSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A pause for a human: ``prompt`` is shown in the ``waiting_input``
    event; the answer (or ``default`` once ``timeout`` seconds pass) is
    appended to the session as a user message."""

    prompt: str
    default: str
    timeout: float = 3600.0


class StepSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    agent: str | None = None
    parallel: list[str] = []
    route: RouteSpec | None = None
    input: InputSpec | None = None


class WorkflowSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    agents: dict[str, AgentSpec]
    steps: list[StepSpec]
    description: str = ""
    rounds: int = 1
    output: str | None = None  # the step whose answer is the task's output


class WorkflowError(ValueError):
    """A workflow file is invalid; ``line`` is 1-based (0 when unknown)."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source}:{line}: {message}" if line else f"{source}: {message}")
        self.source = source
        self.line = line
        self.message = message


def _line_of(node: yaml.Node | None, path: list[str | int]) -> int:
    """The line of the YAML node at ``path`` (or of its nearest parent)."""
    line = node.start_mark.line + 1 if node is not None else 0
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                break
            k, node = match[0]
            line = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _path(text: str) -> list[str | int]:
    """``$.steps[1].agent`` -> ['steps', 1, 'agent']."""
    m = re.search(r"at `\$(.*)`", text)
    if not m:
        return []
    parts: list[str | int] = []
    for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", m.group(1)):
        parts.append(int(index) if index else name)
    return parts


MAX_TOOL_CALLS = 64
MAX_INPUT_TIMEOUT = 30 * 86_400.0  # a month: longer waits are a mistake, not a workflow


def _check(spec: WorkflowSpec, fail: Any, mcp_servers: frozenset[str]) -> None:
    if not is_valid_id(spec.name):
        fail(["name"], f"name must match {ID_PATTERN}")
    if not spec.steps:
        fail(["steps"], "a workflow needs at least one step")
    if spec.rounds < 1 or spec.rounds > 50:
        fail(["rounds"], "rounds must be between 1 and 50")
    for name, agent in spec.agents.items():
        if not is_valid_id(name) or not is_valid_id(agent.pool):
            fail(["agents", name], f"agent and pool names must match {ID_PATTERN}")
        for i, pool in enumerate(agent.pools):
            if not is_valid_id(pool):
                fail(["agents", name, "pools", i], f"pool names must match {ID_PATTERN}")
        if len(set(agent.pools)) != len(agent.pools):
            fail(["agents", name, "pools"], "a pool is named twice")
        if agent.latency_target is not None and not agent.latency_target > 0:
            fail(["agents", name, "latency_target"], "latency_target must be > 0 seconds")
        if not 1 <= agent.max_tokens <= MAX_OUTPUT_TOKENS:
            fail(["agents", name, "max_tokens"], f"max_tokens must be 1..{MAX_OUTPUT_TOKENS}")
        if not is_valid_id(agent.tool_pool):
            fail(["agents", name, "tool_pool"], f"tool_pool must match {ID_PATTERN}")
        for i, tool in enumerate(agent.tools):
            why = check_tool_name(tool, mcp_servers)
            if why is not None:
                fail(["agents", name, "tools", i], why)
        if len(set(agent.tools)) != len(agent.tools):
            fail(["agents", name, "tools"], "a tool is listed twice")
        if agent.tool_choice not in TOOL_CHOICES:
            fail(["agents", name, "tool_choice"], f"tool_choice must be one of {TOOL_CHOICES}")
        if not 0 <= agent.max_tool_calls <= MAX_TOOL_CALLS:
            fail(["agents", name, "max_tool_calls"], f"max_tool_calls must be 0..{MAX_TOOL_CALLS}")
    ids = [s.id for s in spec.steps]
    for i, step in enumerate(spec.steps):
        at: list[str | int] = ["steps", i]
        if not is_valid_id(step.id) or "." in step.id or step.id == DONE:
            fail([*at, "id"], f"step id {step.id!r} must match {ID_PATTERN} and not be 'done'")
        if step.id in ids[:i]:
            fail([*at, "id"], f"duplicate step id {step.id!r}")
        if sum((step.agent is not None, bool(step.parallel), step.input is not None)) != 1:
            fail(at, "a step names exactly one of `agent`, `parallel` or `input`")
        if step.input is not None:
            if step.route is not None:
                fail([*at, "route"], "an input step cannot route")
            if not step.input.prompt.strip():
                fail([*at, "input", "prompt"], "an input step needs a prompt")
            if not 0 < step.input.timeout <= MAX_INPUT_TIMEOUT:
                limit = f"{MAX_INPUT_TIMEOUT:.0f}"
                fail([*at, "input", "timeout"], f"input timeout must be > 0 and at most {limit} s")
            if len(step.input.default.encode()) > MAX_INPUT_BYTES:
                fail([*at, "input", "default"], f"default is over {MAX_INPUT_BYTES} bytes")
        for a in [step.agent] if step.agent else step.parallel:
            if a not in spec.agents:
                fail([*at, "agent" if step.agent else "parallel"], f"unknown agent {a!r}")
        if step.route is not None:
            if step.parallel:
                fail([*at, "route"], "a routing step runs one agent")
            for target in step.route.choices.values():
                if target != DONE and target not in ids:
                    fail([*at, "route", "choices"], f"route to unknown step {target!r}")
            if step.route.default not in step.route.choices:
                fail([*at, "route", "default"], "default must be one of the choices")
    if spec.output is not None and spec.output not in ids:
        fail(["output"], f"output names unknown step {spec.output!r}")


def parse(
    text: str, source: str = "<workflow>", mcp_servers: frozenset[str] = frozenset()
) -> WorkflowSpec:
    """Parse and validate a workflow file. ``mcp_servers``: the MCP servers
    configured (``BATON_MCP_SERVERS``), whose tools agents may name.

    Raises:
        WorkflowError: with the line at fault.
    """
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise WorkflowError(source, mark.line + 1 if mark else 0, str(exc)) from exc

    def fail(path: list[str | int], message: str) -> None:
        raise WorkflowError(source, _line_of(root, path), message)

    if not isinstance(data, dict):
        fail([], "a workflow file is a mapping")
    agents = data.get("agents")
    if isinstance(agents, dict):  # one by one: msgspec's path hides mapping keys
        for name, agent in agents.items():
            try:
                msgspec.convert(agent, AgentSpec)
            except msgspec.ValidationError as exc:
                where: list[str | int] = ["agents", str(name), *_path(str(exc))]
                raise WorkflowError(source, _line_of(root, where), f"agent {name}: {exc}") from exc
    try:
        spec = msgspec.convert(data, WorkflowSpec)
    except msgspec.ValidationError as exc:
        raise WorkflowError(source, _line_of(root, _path(str(exc))), str(exc)) from exc
    _check(spec, fail, mcp_servers)
    return spec


def load_file(path: Path, mcp_servers: frozenset[str] = frozenset()) -> WorkflowSpec:
    return parse(path.read_text(), str(path), mcp_servers)


def load_dir(
    *dirs: Path | None, mcp_servers: frozenset[str] = frozenset()
) -> dict[str, WorkflowSpec]:
    """Every ``*.yaml`` in ``dirs`` (later ones override earlier by name)."""
    found: dict[str, WorkflowSpec] = {}
    for d in dirs:
        if d is None:
            continue
        for path in sorted(Path(d).glob("*.yaml")):
            spec = load_file(path, mcp_servers)
            found[spec.name] = spec
    return found
