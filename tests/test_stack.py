"""`baton up` (what `make up` runs): embedded NATS plus the services, with
authentication on for the bus and the HTTP API; a well-behaved foreground
program: Ctrl-C at any moment stops everything within seconds, a second start
right after the first binds its ports, and a killed `baton up` leaves no
service behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import psutil
import pytest

from baton.dev.testing import Client, uid
from baton.natsd import free_port
from baton.procs import port_free


def _four_free_ports() -> int:
    for _ in range(50):
        base = free_port()
        try:
            for offset in (1, 2, 3):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise AssertionError("no four consecutive free ports")


@dataclass
class Up:
    proc: subprocess.Popen[str]
    data_dir: Path
    nats_port: int
    http_port: int
    lines: list[str]

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.lines
            self.lines.append(self.proc.stdout.readline())

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)


def _up_args(data_dir: Path, nats_port: int, http_port: int) -> list[str]:
    return [sys.executable, "-m", "baton.cli", "up", "--engine", "sim", "--data-dir", str(data_dir),
            "--nats-port", str(nats_port), "--monitor-port", str(free_port()),
            "--http-port", str(http_port)]  # fmt: skip


@contextmanager
def baton_up(data_dir: Path, nats_port: int = 0, http_port: int = 0) -> Iterator[Up]:
    nats_port, http_port = nats_port or free_port(), http_port or _four_free_ports()
    proc = subprocess.Popen(_up_args(data_dir, nats_port, http_port), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    up = Up(proc, data_dir, nats_port, http_port, [])
    try:
        yield up
    finally:
        if proc.poll() is None:
            for child in up.children():
                child.kill()
            proc.kill()
        proc.wait()


def _get(url: str, key: str | None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "baton.cli", *args], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def test_baton_up_serves_a_task_with_keys_on_and_ctrl_c_leaves_no_process(
    tmp_path: Path,
) -> None:
    with baton_up(tmp_path) as up:
        up.wait_for("API docs")
        children = up.children()
        assert len(children) >= 5  # nats-server and four services
        # Authentication is on: the tenant connects with the address and the
        # standard .creds file `baton up` wrote.
        creds = tmp_path / "tenants" / "acme.creds"
        for path in (tmp_path / "tenants" / "acme.url", tmp_path / "operator.url", creds,
                     tmp_path / "operator.creds", tmp_path / "secrets" / "creds" / "orchestrator.creds",
                     tmp_path / "tenants" / "acme.key", tmp_path / "operator.key"):  # fmt: skip
            assert path.stat().st_mode & 0o777 == 0o600, path
        url = (tmp_path / "tenants" / "acme.url").read_text().strip()
        assert url == f"nats://127.0.0.1:{up.nats_port}"
        assert _cli("tenant", "url", "acme", "--data-dir", str(tmp_path)) == url
        assert _cli("tenant", "creds", "acme", "--data-dir", str(tmp_path)) == str(creds.resolve())
        assert "-----BEGIN NATS USER JWT-----" in creds.read_text()
        key = _cli("tenant", "key", "acme", "--data-dir", str(tmp_path))
        assert key == (tmp_path / "tenants" / "acme.key").read_text().strip()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(f"nats://127.0.0.1:{up.nats_port}", allow_reconnect=False)
        url = f"{url}?creds={creds}"
        client = await Client.connect(url, tenant="acme")
        task_id = uid()
        try:
            done = await client.run("chat", {"tenant": "acme", "input": "hi", "task_id": task_id})
            assert done["type"] == "completed"
        finally:
            await client.close()
        # The HTTP API wants a key: 401 without, the tenant's own task with its key.
        api = f"http://127.0.0.1:{up.http_port}"
        status, doc = _get(f"{api}/v1/tasks?tenant=acme", None)
        assert status == 401 and doc["error"]["code"] == "unauthorized"  # type: ignore[index]
        status, doc = _get(f"{api}/v1/tasks/{task_id}", key)
        assert status == 200 and doc["status"] == "completed", doc
        operator = (tmp_path / "operator.key").read_text().strip()
        assert _get(f"{api}/v1/tasks/{task_id}?tenant=acme", operator)[0] == 200
        t0 = time.monotonic()
        up.proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to `baton up`
        assert up.proc.wait(60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], [p.pid for p in alive]
        # Every service stopped by itself: `baton up` kills one only after 30 s.
        assert time.monotonic() - t0 < 15, up.lines[-20:]


async def test_ctrl_c_during_start_up_stops_everything_within_seconds(tmp_path: Path) -> None:
    with baton_up(tmp_path) as up:
        up.wait_for("starting services")  # the services are importing, none is ready
        children = up.children()
        t0 = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(30) == 0, up.lines
        _, alive = psutil.wait_procs(children, timeout=10)
        took = time.monotonic() - t0
        assert alive == [], [p.pid for p in alive]
        assert not any("API docs" in ln for ln in up.lines)  # it did stop before ready
    # Seconds, not the ready timeout: bounded by the start grace plus NATS's stop.
    assert took < 15, took


async def test_a_second_start_right_after_a_stop_binds_the_same_ports(tmp_path: Path) -> None:
    nats_port, http_port = free_port(), _four_free_ports()
    with baton_up(tmp_path, nats_port, http_port) as up:
        up.wait_for("API docs")
        # A client connection leaves a TIME_WAIT socket on the server's port.
        assert _get(f"http://127.0.0.1:{http_port}/readyz", None)[0] == 200
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
    with baton_up(tmp_path, nats_port, http_port) as again:
        again.wait_for("API docs")
        assert not any("already in use" in ln for ln in again.lines)
        again.proc.send_signal(signal.SIGINT)
        assert again.proc.wait(60) == 0


async def test_a_killed_baton_up_leaves_no_service_running(tmp_path: Path) -> None:
    with baton_up(tmp_path) as up:
        up.wait_for("API docs")
        children = up.children()
        assert len(children) >= 5
        up.proc.kill()  # SIGKILL: no handler runs in `baton up`
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], [(p.pid, p.cmdline()) for p in alive]
        assert port_free(up.http_port) and port_free(up.nats_port)


def test_a_port_held_by_a_live_server_is_named_with_its_holder(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = subprocess.run(_up_args(tmp_path, free_port(), port), capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert f"port {port} (orchestrator HTTP) is already in use by pid {os.getpid()}" in out.stderr
