"""The ``baton`` command through ``subprocess``, as a user runs it: exit
codes, one-line errors, streamed answers, ``--json``, and the commands that
talk to the HTTP API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from baton.dev.testing import Client, LocalStack, uid
from baton.natsd import free_port


def baton(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    import os

    return subprocess.run([sys.executable, "-m", "baton.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


async def test_submit_streams_the_answer_and_exits_0(stack: LocalStack, client: Client) -> None:
    tenant = "cli"
    r = baton(
        "submit", "chat", "hello cli", "--tenant", tenant, "--nats-url", stack.url_for(tenant)
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("[r1.answer assistant] [sim: 2 messages")
    assert "completed:" in r.stderr and "tokens" in r.stderr
    j = baton("submit", "chat", "hello json", "--tenant", tenant, "--nats-url", stack.url_for(tenant),
              "--json", "--task-id", (task_id := uid()))  # fmt: skip
    assert j.returncode == 0, j.stderr
    lines = [json.loads(line) for line in j.stdout.splitlines()]
    assert lines[-1]["type"] == "completed" and lines[-1]["task_id"] == task_id
    streamed = "".join(x["text"] for x in lines if "text" in x and "offset" in x)
    assert streamed == lines[-1]["output"]


async def test_a_failed_task_exits_1(stack: LocalStack) -> None:
    r = baton("submit", "nope", "x", "--tenant", "cli", "--nats-url", stack.url_for("cli"))
    assert r.returncode == 1
    assert "unknown_workflow" in r.stderr


def _startup() -> float:
    """Seconds the same command takes to start and refuse a bad name (no
    network): the part of a run the NATS probe's bound does not cover, which a
    loaded box stretches."""
    t0 = time.monotonic()
    assert baton("submit", "bad wf", "x", "--tenant", "acme").returncode == 2
    return time.monotonic() - t0


GIVES_UP_WITHIN = 20.0  # seconds beside the start-up; the retries it replaced take 120


async def test_an_unreachable_nats_url_fails_fast_with_one_line_naming_it() -> None:
    port = free_port()
    url = f"nats://someone:s3cret@127.0.0.1:{port}"
    start = _startup()
    t0 = time.monotonic()
    r = baton("submit", "chat", "x", "--tenant", "acme", "--nats-url", url, timeout=30)
    took = time.monotonic() - t0
    assert r.returncode == 3
    # The probe gives up after 3 s; nats-py's own connect retries would take
    # 2 s x 60 here. The bound tells those apart on a loaded box (4.5 s did not).
    assert took - start <= GIVES_UP_WITHIN, (took, start)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"nats://someone:***@127.0.0.1:{port}" in lines[0] and "s3cret" not in r.stderr
    # Something listens there but never speaks NATS: still one line, in time.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        url = f"nats://127.0.0.1:{mute.getsockname()[1]}"
        start = _startup()
        t0 = time.monotonic()
        r = baton("submit", "chat", "x", "--tenant", "acme", "--nats-url", url, timeout=30)
        took = time.monotonic() - t0
    assert r.returncode == 3 and took - start <= GIVES_UP_WITHIN, (r.stderr, took, start)
    assert len(r.stderr.strip().splitlines()) == 1 and url in r.stderr


async def test_invalid_names_get_one_line_with_the_rule() -> None:
    for args in (["submit", "chat", "x", "--tenant", "ac.me"], ["submit", "bad wf", "x", "--tenant", "acme"],
                 ["status", "a/b", "--tenant", "acme"]):  # fmt: skip
        r = baton(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "[A-Za-z0-9_-]{1,64}" in lines[0], r.stderr


async def test_status_tasks_cancel_and_workflows_use_the_http_api(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "cli-list", uid()
    await client.run("chat", {"tenant": tenant, "input": "for status", "task_id": task_id})
    api = ["--api-url", stack.orchestrator.url]
    s = baton("status", task_id, "--tenant", tenant, *api, "--json")
    assert s.returncode == 0 and json.loads(s.stdout)["status"] == "completed"
    pretty = baton("status", task_id, "--tenant", tenant, *api)
    assert pretty.returncode == 0 and "r1.answer" in pretty.stdout and "completed" in pretty.stdout
    t = baton("tasks", "--tenant", tenant, *api, "--json")
    assert [x["task_id"] for x in json.loads(t.stdout)["tasks"]] == [task_id]
    assert task_id in baton("tasks", "--tenant", tenant, *api).stdout
    missing = baton("status", uid(), "--tenant", tenant, *api)
    assert missing.returncode == 1 and missing.stderr.startswith("baton: unknown_task:")
    c = baton("cancel", task_id, "--tenant", tenant, *api)  # already over: stays completed
    assert c.returncode == 0 and c.stdout.strip() == f"{task_id}: completed"
    w = baton("workflows", *api)
    assert w.returncode == 0 and "research" in w.stdout
    down = baton("tasks", "--tenant", tenant, "--api-url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 3 and "cannot reach the orchestrator" in down.stderr


def test_workflows_check_validates_a_file(tmp_path: Path) -> None:
    good = Path("services/orchestrator/workflows/research.yaml")
    r = baton("workflows", "check", str(good))
    assert r.returncode == 0 and "ok" in r.stdout and "'research'" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nagents:\n  a: {role: a, system: s}\nsteps:\n  - id: one\n    agent: nobody\n"
    )
    r = baton("workflows", "check", str(bad))
    assert r.returncode == 1
    assert r.stderr.startswith(f"baton: {bad}:") and len(r.stderr.strip().splitlines()) == 1


def test_up_names_a_port_that_is_taken_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = baton("up", "--engine", "sim", "--data-dir", str(tmp_path), "--nats-port", str(free_port()),
                  "--monitor-port", str(free_port()), "--http-port", str(port), timeout=30)  # fmt: skip
    assert r.returncode == 1
    assert f"port {port} (orchestrator HTTP) is already in use" in r.stderr
    assert not (tmp_path / "nats").exists()  # nothing was started


async def test_deltas_behind_the_terminal_event_are_shown_before_it(
    own_nats: Any, capsys: Any
) -> None:
    """nats-py hands each subscription's messages over in a task of its own: a
    ``completed`` that arrived right behind a step's deltas could be handed over
    first and the answer went unprinted (seen about 1 run in 6). Here Baton's
    side is played by hand with the wire order it has — ``accepted``, the
    deltas, ``completed`` in one write — on a real nats-server with accounts."""
    from baton.bus import connect
    from baton.submit import submit
    from proto import codec, streams, subjects
    from proto.messages import Accepted, Completed, TokenDelta, Usage

    baton_side = await connect(own_nats.url, name="plays-baton")
    await baton_side.provision(streams=[streams.tenant_tasks("cli")])
    text = "the answer, in two deltas"

    async def on_task(msg: Any) -> None:
        task_id = codec.decode(msg.data, dict)["task_id"]
        ev, tok = subjects.event("cli", task_id), subjects.tokens("cli", task_id)
        base = {"task_id": task_id, "tenant": "cli"}
        await baton_side.notify(ev, Accepted(**base, workflow="chat"))
        for i, part in enumerate((text[:10], text[10:])):
            await baton_side.notify(tok, TokenDelta(**base, step="r1.answer", agent="assistant",
                                    attempt="a", index=i, offset=10 * i, text=part, final=i == 1))  # fmt: skip
        await baton_side.notify(ev, Completed(**base, output=text, usage=Usage(), cost_usd=0.0))

    await baton_side.subscribe_raw(subjects.tenant_task("cli", "chat"), on_task)
    tenant = await connect(own_nats.url_for("cli"), name="cli-test")
    try:
        for mode in ("json", "plain", "json", "plain"):
            body = {"task_id": uid(), "tenant": "cli", "input": "x"}
            assert await submit(tenant, "chat", body, mode=mode, timeout=20) == 0
            out = capsys.readouterr().out
            if mode == "plain":
                assert out.strip() == f"[r1.answer assistant] {text}"
            else:
                lines = [json.loads(line) for line in out.splitlines()]
                assert lines[-1]["type"] == "completed"
                assert "".join(x["text"] for x in lines if "offset" in x) == text
    finally:
        await tenant.close()
        await baton_side.close()
