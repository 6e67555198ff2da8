"""Ctrl-C while `baton up` waits for vLLM to load stops everything within
seconds, the engine's own processes included (a worker still starting is
not waited for to drain: its engine core is booting and cannot be stopped
mid-way)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from baton.natsd import free_port

pytestmark = pytest.mark.vllm


def test_ctrl_c_while_the_engine_loads_stops_every_process(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    http = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", "up", "--engine", "vllm", "--data-dir", str(tmp_path),
         "--nats-port", str(free_port()), "--monitor-port", str(free_port()),
         "--http-port", str(http)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "BATON_MODEL": str(tiny_model_dir)},
    )  # fmt: skip
    try:
        assert up.stdout is not None
        lines: list[str] = []
        while not any("starting services" in ln for ln in lines):
            assert up.poll() is None, lines
            lines.append(up.stdout.readline())
        # Wait until the worker has started its engine (a process of its own).
        deadline = time.monotonic() + 60
        while True:
            tree = psutil.Process(up.pid).children(recursive=True)
            if any("EngineCore" in " ".join(p.cmdline()) or p.name().startswith("VLLM")
                   for p in tree if p.is_running()):  # fmt: skip
                break
            assert time.monotonic() < deadline, [p.cmdline() for p in tree]
            time.sleep(0.2)
        children = psutil.Process(up.pid).children(recursive=True)
        t0 = time.monotonic()
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        took = time.monotonic() - t0
        assert alive == [], [(p.pid, p.name()) for p in alive]
        assert took < 15, took
    finally:
        if up.poll() is None:
            for p in psutil.Process(up.pid).children(recursive=True):
                p.kill()
            up.kill()
        up.wait()
