"""``python``: run a model's code in a sandbox — its layers, what each stops,
and the spare sandboxes: docs/tools.md, "`python` — code in a sandbox"."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import resource
import select
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from proto.errors import ErrorCode
from proto.tools import BUILTIN_SPECS, PYTHON_PARAMETERS

from . import CallContext, ToolError, ToolOutput
from .cgroups import SlotCgroup

BWRAP = "bwrap"


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 2**20
    processes: int = 32
    file_bytes: int = 16 * 2**20
    open_files: int = 64
    output_bytes: int = 64 * 1024
    uid_base: int = 61000  # slot i runs as uid/gid uid_base + i
    slots: int = 4
    interpreter: str = "/usr/bin/python3"
    spares: bool = True  # start each slot's next sandbox before its call


@dataclass(slots=True)
class RunResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    cpu_seconds: float
    wall_seconds: float
    timed_out: bool = False
    too_much_output: bool = False
    stopped: bool = False  # killed on request (the task was cancelled)


class Stop:
    """A kill switch for one sandboxed run, safe to pull from the event loop
    while the run blocks in its thread: a pipe the run's read loop selects
    on, so the process tree is killed at once, not at the next poll."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


# Inside the sandbox: wait for the program on stdin (named baton-spare while
# waiting), say it arrived (one ACK byte on stdout, which the worker takes
# off), keep it as main.py, run it as ``python main.py`` would (its own
# ``__main__``, tracebacks without this loader's frame, exit status 1).
LOADER = """\
import sys, types
def name(n):
    with open('/proc/self/comm', 'w') as f:
        f.write(n)
name('baton-spare')
src = sys.stdin.buffer.read()
sys.stdout.buffer.write(b'\x06')  # received: the program starts now
name('python3')
with open('main.py', 'wb') as f:
    f.write(src)
sys.argv[:] = ['main.py']
main = types.ModuleType('__main__')
main.__file__ = '/sandbox/main.py'
sys.modules['__main__'] = main
del name, f, types
try:
    exec(compile(src, 'main.py', 'exec'), main.__dict__)
except SystemExit:
    raise
except BaseException as e:
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
"""


def bwrap_command(workdir: str, interpreter: str) -> list[str]:
    """The bubblewrap command line of a sandbox that reads its program from
    stdin and runs it as ``/sandbox/main.py``."""
    return [
        BWRAP,
        "--unshare-all", "--unshare-user", "--disable-userns",
        "--die-with-parent", "--new-session",
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin",
        "--proc", "/proc", "--dev", "/dev",
        "--bind", workdir, "/sandbox", "--chdir", "/sandbox",
        "--remount-ro", "/",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin", "--setenv", "HOME", "/sandbox",
        "--setenv", "TMPDIR", "/sandbox", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        interpreter, "-I", "-u", "-c", LOADER, "main.py",
    ]  # fmt: skip


def available() -> bool:
    return shutil.which(BWRAP) is not None


def _limiter(limits: SandboxLimits, uid: int, cgroup: SlotCgroup | None) -> Any:
    def apply() -> None:  # runs in the child between fork and exec
        os.setsid()
        if cgroup is not None:
            cgroup.join()
        # CPU: SIGXCPU at the soft limit (the process dies of it), SIGKILL a
        # second later should it catch that signal.
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        for which, value in (
            (resource.RLIMIT_AS, limits.memory_bytes),
            (resource.RLIMIT_NPROC, limits.processes),
            (resource.RLIMIT_FSIZE, limits.file_bytes),
            (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_CORE, 0),
        ):
            resource.setrlimit(which, (value, value))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    return apply


@dataclass(slots=True)
class Sandbox:
    """A started sandbox waiting for its program (``start``), run once (``run_in``)."""

    proc: subprocess.Popen[bytes]
    workdir: str
    cgroup: SlotCgroup | None
    cpu_before: float

    def discard(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.proc.pid, 0)
        self.proc.returncode = -signal.SIGKILL
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(limits: SandboxLimits, slot: int, cgroup: SlotCgroup | None = None) -> Sandbox:
    """Blocking: a sandbox for slot ``slot``, in a fresh directory, its
    interpreter up and waiting for the program on stdin."""
    uid = limits.uid_base + slot
    if cgroup is not None:
        # The previous run's PID namespace is torn down asynchronously (over a
        # second on some machines): wait here, before the next run, so the wait
        # overlaps the other slots' work (and, with spares, no call's).
        cgroup.settle()
    cpu_before = cgroup.cpu_seconds() if cgroup is not None else 0.0
    workdir = tempfile.mkdtemp(prefix="baton-sandbox-")
    try:
        os.chmod(workdir, 0o700)
        if os.geteuid() == 0:
            os.chown(workdir, uid, uid)
        proc = subprocess.Popen(
            bwrap_command(workdir, limits.interpreter),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_limiter(limits, uid, cgroup) if os.geteuid() == 0 else os.setsid,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Sandbox(proc, workdir, cgroup, cpu_before)


def run_in(
    sandbox: Sandbox,
    code: str,
    limits: SandboxLimits,
    timeout: float,
    stop: Stop | None = None,
    *,
    spare: bool = False,
) -> RunResult:
    """Blocking: run ``code`` in ``sandbox`` (call it in a thread); its
    directory is removed afterwards. ``stop`` set: the process tree is killed
    now. ``spare``: raise ``BrokenPipeError`` when the sandbox died before
    its program reached it (nothing ran: start another); else that failure
    is the result (bubblewrap's own error, say)."""
    proc, cgroup = sandbox.proc, sandbox.cgroup
    assert proc.stdin is not None
    try:
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(code.encode())
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        if not _received(proc, started + timeout, stop) and spare:
            sandbox.discard()
            raise BrokenPipeError("the spare sandbox died before its program reached it")
        out, err, timed_out, too_much, stopped = _collect(
            proc, limits.output_bytes, started + timeout, stop
        )
        if timed_out or too_much or stopped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        cpu = usage.ru_utime + usage.ru_stime
        if cgroup is not None:
            cpu = max(cpu, cgroup.cpu_seconds() - sandbox.cpu_before)
        return RunResult(
            returncode=proc.returncode,
            stdout=out,
            stderr=err,
            cpu_seconds=cpu,
            wall_seconds=time.monotonic() - started,
            timed_out=timed_out,
            too_much_output=too_much,
            stopped=stopped,
        )
    finally:
        shutil.rmtree(sandbox.workdir, ignore_errors=True)


def run_sandboxed(
    code: str,
    limits: SandboxLimits,
    slot: int,
    timeout: float,
    cgroup: SlotCgroup | None = None,
    stop: Stop | None = None,
) -> RunResult:
    """Blocking: ``code`` in a sandbox started for it (no spare)."""
    return run_in(start(limits, slot, cgroup), code, limits, timeout, stop)


def _received(proc: subprocess.Popen[bytes], deadline: float, stop: Stop | None) -> bool:
    """Whether the sandbox said its program arrived (the loader's ACK byte,
    read off stdout here) before the deadline; False if it ended first."""
    assert proc.stdout is not None
    fds = [proc.stdout.fileno(), *([stop.fileno()] if stop is not None else [])]
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(fds, [], [], min(left, 0.5))
        if proc.stdout.fileno() in ready:
            return os.read(proc.stdout.fileno(), 1) == b"\x06"
        if ready:  # stopped
            return False
    return False


def _collect(
    proc: subprocess.Popen[bytes], limit: int, deadline: float, stop: Stop | None = None
) -> tuple[bytes, bytes, bool, bool, bool]:
    """Read stdout and stderr until both close, the deadline passes,
    together they exceed ``limit`` bytes or ``stop`` is set."""
    assert proc.stdout is not None and proc.stderr is not None
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        sel.register(f, selectors.EVENT_READ)
    if stop is not None:
        sel.register(stop.fileno(), selectors.EVENT_READ)
    timed_out = too_much = stopped = False
    try:
        while any(fd in sel.get_map() for fd in bufs) and not stopped:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                if stop is not None and key.fd == stop.fileno():
                    stopped = True
                    break
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                bufs[key.fd] += chunk
            if sum(len(b) for b in bufs.values()) > limit:
                too_much = True
                break
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    out, err = bufs.values()
    return bytes(out[:limit]), bytes(err[:limit]), timed_out, too_much, stopped


def _discard(spare: asyncio.Future[Sandbox]) -> None:
    if not spare.cancelled() and spare.exception() is None:
        spare.result().discard()


def _tail(data: bytes, n: int = 2000) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= n else "…" + text[-n:]


class PythonTool:
    name = "python"
    description = BUILTIN_SPECS["python"].description
    parameters: dict[str, Any] = PYTHON_PARAMETERS

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._free = collections.deque(range(self.limits.slots))
        self._slot_ready = asyncio.Semaphore(self.limits.slots)
        self.cgroups = {
            i: SlotCgroup.create(self.limits.uid_base + i, self.limits.processes)
            for i in self._free
        } if os.geteuid() == 0 else {}  # fmt: skip
        self._spares: dict[int, asyncio.Future[Sandbox]] = {}

    def start_spares(self) -> None:
        """A spare sandbox for each free slot (with ``limits.spares``)."""
        for slot in self._free:
            self._spare(slot)

    def _spare(self, slot: int) -> None:
        if self.limits.spares and available() and slot not in self._spares:
            self._spares[slot] = asyncio.ensure_future(
                asyncio.to_thread(start, self.limits, slot, self.cgroups.get(slot))
            )

    def close(self) -> None:
        """Kill the spares (a stopping worker's; bubblewrap's
        ``--die-with-parent`` covers a worker that dies)."""
        for spare in self._spares.values():
            spare.add_done_callback(_discard)
        self._spares.clear()

    async def _run(self, slot: int, code: str, timeout: float, stop: Stop) -> RunResult:
        spare = self._spares.pop(slot, None)
        sandbox = None
        if spare is not None:
            with contextlib.suppress(Exception):
                sandbox = await spare
        if sandbox is not None:
            with contextlib.suppress(BrokenPipeError):  # it died waiting: start one
                return await asyncio.to_thread(
                    run_in, sandbox, code, self.limits, timeout, stop, spare=True
                )
        return await asyncio.to_thread(
            run_sandboxed, code, self.limits, slot, timeout, self.cgroups.get(slot), stop
        )

    async def run(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        if not available():
            raise ToolError(ErrorCode.TOOL_FAILED, "the sandbox (bubblewrap) is not installed")
        async with self._slot_ready:
            slot = self._free.popleft()
            stop = Stop()
            run = asyncio.ensure_future(self._run(slot, args["code"], ctx.timeout, stop))

            def release(_: object) -> None:  # once the run is over, whatever happened
                stop.close()
                self._spare(slot)
                self._free.append(slot)

            run.add_done_callback(release)
            try:
                r = await asyncio.shield(run)
            except asyncio.CancelledError:
                # The call was cancelled (its task was, or the worker stops):
                # kill the process tree now, and return once it is gone.
                stop.set()
                with contextlib.suppress(Exception):
                    await run
                raise
        return self.judge(r)

    def judge(self, r: RunResult) -> ToolOutput:
        """A finished run as the agent sees it: output, or an error naming the limit hit."""
        cpu = round(r.cpu_seconds, 4)
        if r.timed_out:
            raise ToolError(ErrorCode.TOOL_TIMEOUT, f"killed after {r.wall_seconds:.1f}s wall time",
                            cpu_seconds=cpu)  # fmt: skip
        if r.too_much_output:
            raise ToolError(
                ErrorCode.TOOL_OUTPUT_TOO_LARGE,
                f"output exceeded {self.limits.output_bytes} bytes; the program was killed",
                cpu_seconds=cpu,
            )
        signum = -r.returncode if r.returncode < 0 else r.returncode - 128
        if r.returncode < 0 or 128 < r.returncode < 160:  # bwrap reports 128 + signal
            sig = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
            why = {
                "SIGXCPU": f"CPU time limit ({self.limits.cpu_seconds}s) exceeded",
                "SIGKILL": "killed (CPU time limit or out of memory)",
                "SIGXFSZ": f"file size limit ({self.limits.file_bytes} bytes) exceeded",
            }.get(sig, f"killed by {sig}")
            raise ToolError(
                ErrorCode.TOOL_FAILED, f"{why}; stderr: {_tail(r.stderr, 500)}", cpu_seconds=cpu
            )
        if r.returncode != 0:
            raise ToolError(
                ErrorCode.TOOL_FAILED,
                f"exit code {r.returncode}; stderr: {_tail(r.stderr)}",
                cpu_seconds=cpu,
            )
        n = self.limits.output_bytes
        body = {"exit_code": 0, "stdout": _tail(r.stdout, n), "stderr": _tail(r.stderr, n)}
        return ToolOutput(json.dumps(body, ensure_ascii=False), cpu_seconds=cpu)
