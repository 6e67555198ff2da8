"""`baton up` (what `make up` runs): embedded NATS plus the three services;
Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.errors
import psutil
import pytest

from baton.natsd import free_port
from baton.testing import Client, uid


def _three_free_ports() -> int:
    for _ in range(50):
        base = free_port()
        try:
            for offset in (1, 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise AssertionError("no three consecutive free ports")


async def test_baton_up_serves_a_task_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    nats_port, http = free_port(), _three_free_ports()
    up = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", "up", "--engine", "sim", "--data-dir", str(tmp_path),
         "--nats-port", str(nats_port), "--monitor-port", str(free_port()),
         "--http-port", str(http)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 60
        lines = []
        while not any("API docs" in ln for ln in lines):
            assert time.monotonic() < deadline and up.poll() is None, lines
            lines.append(up.stdout.readline())
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # nats-server and three services
        # Authentication is on: the tenant connects with the URL `baton up` wrote.
        url_file = tmp_path / "tenants" / "acme.url"
        assert url_file.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "operator.url").stat().st_mode & 0o777 == 0o600
        url = url_file.read_text().strip()
        assert url.startswith("nats://acme:") and url.endswith(f"@127.0.0.1:{nats_port}")
        printed = subprocess.run(
            [sys.executable, "-m", "baton.cli", "tenant", "url", "acme", "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert printed.stdout.strip() == url
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(f"nats://127.0.0.1:{nats_port}", allow_reconnect=False)
        client = await Client.connect(url, tenant="acme")
        try:
            done = await client.run("chat", {"tenant": "acme", "input": "hi", "task_id": uid()})
            assert done["type"] == "completed"
        finally:
            await client.close()
        up.send_signal(signal.SIGINT)  # what Ctrl-C delivers to `baton up`
        assert up.wait(60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], [p.pid for p in alive]
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
