"""``baton submit``'s display of parallel agents: on a terminal, one live
line per agent and each step's text printed whole when it ends; on a pipe,
one step's text at a time; ``--json`` unchanged. Never interleaved token by
token (as it was: ``[r1.gather.retrieval retrieval] tool`` /
``[r1.gather.coding coding] _`` / ...)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from typing import Any

from rich.console import Console

from baton.dev.testing import LocalStack, http_json, uid
from baton.submit import PlainStreams, TaskView
from proto.messages import Step, TokenDelta

RESEARCH = "compare two sorting algorithms"


def _delta(step: str, agent: str, text: str, final: bool = False, attempt: str = "a") -> TokenDelta:
    return TokenDelta(task_id="t", tenant="acme", step=step, agent=agent, attempt=attempt,
                      text=text, final=final)  # fmt: skip


def test_plain_streams_hold_a_parallel_branch_until_the_one_streaming_ends() -> None:
    out = io.StringIO()
    p = PlainStreams(out)
    for i in range(3):  # two branches, token by token, interleaved on the wire
        p.delta(_delta("r1.gather.retrieval", "retrieval", f"r{i} "), again=False)
        p.delta(_delta("r1.gather.coding", "coding", f"c{i} "), again=False)
    p.delta(_delta("r1.gather.coding", "coding", "end", final=True), again=False)
    p.delta(_delta("r1.gather.retrieval", "retrieval", "end", final=True), again=False)
    p.delta(_delta("r1.validate", "validation", "ok", final=True), again=False)
    p.close()
    assert out.getvalue().splitlines() == [
        "[r1.gather.retrieval retrieval] r0 r1 r2 end",
        "[r1.gather.coding coding] c0 c1 c2 end",
        "[r1.validate validation] ok",
    ]


def test_live_regions_are_one_line_per_agent_with_its_own_newest_text() -> None:
    view = TaskView("t1", "research")
    for step, agent in (("r1.gather.retrieval", "retrieval"), ("r1.gather.coding", "coding")):
        view.on_event(Step(task_id="t1", step=step, agent=agent, status="started"))
    for i in range(40):
        view.on_delta(_delta("r1.gather.retrieval", "retrieval", f"R{i} "))
        view.on_delta(_delta("r1.gather.coding", "coding", f"C{i} "))
    console = Console(file=io.StringIO(), width=80, record=True, color_system=None)
    console.print(view.render(80))
    lines = console.export_text().splitlines()
    assert len(lines) == 3  # the title and one line per running agent
    retrieval, coding = lines[1], lines[2]
    assert "retrieval" in retrieval and "R39" in retrieval and "C" not in retrieval.split("│")[1]
    assert "coding" in coding and "C39" in coding and "R" not in coding.split("│")[1]
    assert all(len(line) <= 80 for line in lines)
    view.on_event(Step(task_id="t1", step="r1.gather.coding", agent="coding", status="done"))
    assert [s for s, _ in view.finished()] == ["r1.gather.coding"]
    assert view.finished() == []  # printed once


def _status(stack: LocalStack, task_id: str) -> dict[str, Any]:
    return http_json(f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant=cli")  # type: ignore[no-any-return]


def test_submit_research_on_a_pipe_prints_each_step_whole(stack: LocalStack) -> None:
    task_id = uid()
    r = subprocess.run(
        [sys.executable, "-m", "baton.cli", "submit", "research", RESEARCH, "--tenant", "cli",
         "--nats-url", stack.url_for("cli"), "--task-id", task_id],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    blocks: dict[str, list[str]] = {}
    for line in r.stdout.strip().splitlines():
        m = re.match(r"^\[(r\d+\.[\w.]+) (\w+)\] ?(.*)$", line)
        assert m, f"a line that is not one step's text: {line!r}"
        blocks.setdefault(m.group(1), []).append(m.group(3))
    steps = _status(stack, task_id)["steps"]
    assert set(blocks) == set(steps)
    for step_id, st in steps.items():  # each model turn's text whole, on one line
        assert len(blocks[step_id]) <= st["turn"] + 1, (step_id, blocks[step_id])
        assert blocks[step_id][-1] == st["output"]


def test_submit_research_on_a_terminal_shows_live_lines_and_each_text_once(
    stack: LocalStack,
) -> None:
    task_id = uid()
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", "submit", "research", RESEARCH, "--tenant", "cli",
         "--nats-url", stack.url_for("cli"), "--task-id", task_id],
        stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True,
        env={**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"},
    )  # fmt: skip
    os.close(secondary)
    raw = b""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            raw += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(primary)
    assert proc.returncode == 0, raw[-2000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode(errors="replace"))
    steps = _status(stack, task_id)["steps"]
    for step_id, st in steps.items():
        assert re.search(rf"{re.escape(step_id)} {st['agent']}\s*─", text), step_id  # its rule
        assert st["output"][:60] in text  # its whole text, above the live lines
    assert "completed:" in text


def test_json_stays_one_object_per_line(stack: LocalStack) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "baton.cli", "submit", "research", RESEARCH, "--tenant", "cli",
         "--nats-url", stack.url_for("cli"), "--json"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert docs[-1]["type"] == "completed"
    assert {d["step"] for d in docs if "offset" in d} >= {"r1.gather.coding", "r1.gather.retrieval"}
