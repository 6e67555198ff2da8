"""The python tool's sandbox, through a real tool worker process: each
escape attempt is contained, reported to the agent as a tool error, and the
worker lives on to run the next call."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import AsyncIterator

import psutil
import pytest

from baton.bus import Bus
from baton.dev.testing import LocalStack, http_get, metric, uid
from services.tool_worker.tools import CallContext
from services.tool_worker.tools.python import PythonTool, RunResult, SandboxLimits, bwrap_command
from tests import tools
from tests.tools import call_tool, session_with_call

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")

UID_BASE = 62000


@pytest.fixture(scope="module")
def sandbox_pool(stack: LocalStack) -> AsyncIterator[tuple[str, str]]:
    """A tool worker of its own pool with a 1 s CPU limit (so the CPU test is quick)."""
    pool = uid("sbx")
    proc = stack.tool_worker(BATON_POOL=pool, BATON_SANDBOX_CPU_SECONDS="1",
                             BATON_SANDBOX_UID_BASE=str(UID_BASE),
                             BATON_BUILTIN_TOOLS='["python"]').wait_ready()  # fmt: skip
    yield pool, proc.url
    stack.retire(proc)


async def run(bus: Bus, pool: str, code: str, timeout: float = 0.0) -> tuple[str, str]:
    tenant, session = uid("acme"), uid("s")
    ref = await session_with_call(bus, tenant, session)
    res = await call_tool(bus, tenant, session, ref, "python", {"code": code}, pool=pool,
                          job_timeout=timeout, call=uid("c"))  # fmt: skip
    return res.outcome, res.error.message if res.error else res.preview


async def alive(bus: Bus, pool: str, url: str) -> None:
    assert json.loads(http_get(f"{url}/healthz"))["status"] == "ok"
    outcome, out = await run(bus, pool, "print(6 * 7)")
    assert outcome == "ok" and json.loads(out)["stdout"] == "42\n"


def sandbox_processes() -> list[psutil.Process]:
    return tools.sandbox_processes(UID_BASE, 16)


async def test_an_infinite_loop_is_stopped_by_the_cpu_limit(
    bus: Bus, sandbox_pool: tuple[str, str]
) -> None:
    pool, url = sandbox_pool
    outcome, message = await run(bus, pool, "while True:\n    pass")
    assert outcome == "tool_failed" and "CPU time limit (1s)" in message
    await alive(bus, pool, url)


async def test_a_fork_bomb_is_capped_and_leaves_no_process(
    bus: Bus, sandbox_pool: tuple[str, str]
) -> None:
    pool, url = sandbox_pool
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    outcome, message = await run(bus, pool, bomb, timeout=3)
    assert outcome in ("tool_timeout", "tool_failed"), message
    for _ in range(50):
        if not sandbox_processes():
            break
        await asyncio.sleep(0.1)
    assert sandbox_processes() == []
    await alive(bus, pool, url)


async def test_a_2gb_allocation_fails_inside_the_sandbox(
    bus: Bus, sandbox_pool: tuple[str, str]
) -> None:
    pool, url = sandbox_pool
    outcome, message = await run(bus, pool, "x = bytearray(2 * 1024**3)\nprint(len(x))")
    assert outcome == "tool_failed" and "MemoryError" in message
    await alive(bus, pool, url)


async def test_the_network_is_unreachable(bus: Bus, sandbox_pool: tuple[str, str]) -> None:
    pool, url = sandbox_pool
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    try:
        outcome, message = await run(bus, pool, code)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's listener
    finally:
        listener.close()
    assert outcome == "tool_failed" and "connected" not in message
    assert "ConnectionRefusedError" in message or "unreachable" in message
    await alive(bus, pool, url)


async def test_nothing_outside_its_directory_is_writable(
    bus: Bus, sandbox_pool: tuple[str, str]
) -> None:
    pool, url = sandbox_pool
    for code in ("open('/etc/passwd', 'a').write('x')", "import os; os.makedirs('/etc/baton')",
                 "open('/usr/lib/evil', 'w')"):  # fmt: skip
        outcome, message = await run(bus, pool, code)
        assert outcome == "tool_failed", (code, message)
        assert "Read-only file system" in message or "No such file" in message
    outcome, out = await run(
        bus, pool, "open('mine.txt', 'w').write('ok'); print(open('mine.txt').read())"
    )
    assert outcome == "ok" and json.loads(out)["stdout"] == "ok\n"
    await alive(bus, pool, url)


async def test_too_much_output_kills_the_program() -> None:
    tool = PythonTool()
    big = RunResult(returncode=-9, stdout=b"x" * 10, stderr=b"", cpu_seconds=0.1,
                    wall_seconds=0.2, too_much_output=True)  # fmt: skip
    with pytest.raises(Exception, match="output exceeded"):
        tool.judge(big)


def test_the_sandbox_shares_no_namespace_and_binds_only_usr_read_only() -> None:
    cmd = bwrap_command("/tmp/x", "/usr/bin/python3")
    assert {"--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"} <= set(cmd)
    binds = [(cmd[i], cmd[i + 1], cmd[i + 2]) for i, a in enumerate(cmd) if a.endswith("bind")]
    assert binds == [("--ro-bind", "/usr", "/usr"), ("--bind", "/tmp/x", "/sandbox")]
    assert cmd[cmd.index("--remount-ro") + 1] == "/"


# The seconds since the sandbox's interpreter started, as the program sees it.
AGE = """import os
start = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])
up = float(open('/proc/uptime').read().split()[0])
print(up - start / os.sysconf('SC_CLK_TCK'))
"""


async def test_a_call_finds_its_sandbox_started_and_uses_it_once() -> None:
    ctx = CallContext(tenant="acme", task_id=uid("t"), call_id="c", timeout=10.0)
    ages: dict[bool, float] = {}
    for spares in (True, False):
        tool = PythonTool(SandboxLimits(slots=1, uid_base=UID_BASE + 8, spares=spares))
        tool.start_spares()
        try:
            await asyncio.sleep(1.5)
            ages[spares] = float(json.loads((await tool.run({"code": AGE}, ctx)).text)["stdout"])
            if spares:
                # The next call's spare is a new sandbox: nothing of this call is in it.
                await tool.run({"code": "open('mine.txt', 'w').write('x')"}, ctx)
                await asyncio.sleep(0.5)
                out = await tool.run({"code": "import os; print(os.listdir('.'))"}, ctx)
                assert json.loads(out.text)["stdout"] == "['main.py']\n"
                # A spare that died waiting is replaced by a fresh sandbox.
                await asyncio.sleep(0.5)
                spare = [p for p in psutil.process_iter(["name", "uids"])
                         if p.info["name"] == "baton-spare" and p.info["uids"].real == UID_BASE + 8]  # fmt: skip
                assert len(spare) == 1
                spare[0].kill()
                out = await tool.run({"code": "print(6 * 7)"}, ctx)
                assert json.loads(out.text)["stdout"] == "42\n"
        finally:
            tool.close()
    # Started before the call (it waited 1.5 s): the interpreter's start-up is
    # not the call's; without spares the sandbox starts when the call comes.
    assert ages[True] > 1.0 > ages[False], ages


async def test_a_tool_pools_backlog_is_exported_for_its_scaler(
    bus: Bus, stack: LocalStack, sandbox_pool: tuple[str, str]
) -> None:
    """KEDA scales tool workers on the orchestrator's
    baton_consumer_pending_messages{stream="BATON_TOOLS", consumer="tools-<pool>"}."""
    pool, _ = sandbox_pool
    call = asyncio.create_task(run(bus, pool, "import time\ntime.sleep(5)\nprint('ok')", 20))
    try:
        seen = 0.0
        for _ in range(60):  # the orchestrator reads every pending_poll_interval (0.5 s here)
            seen = metric(stack.orchestrator.url, "baton_consumer_pending_messages",
                          stream="BATON_TOOLS", consumer=f"tools-{pool}")  # fmt: skip
            if seen:
                break
            await asyncio.sleep(0.25)
        assert seen == 1  # the sleeping call, held by the worker
    finally:
        assert (await call)[0] == "ok"
