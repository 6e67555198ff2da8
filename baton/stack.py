"""``baton up``: embedded NATS plus the services as child processes.

Each service is its own process (as in production), started with the same
environment plus ``BATON_NATS_URL``. Ctrl-C (or SIGTERM) stops the services
first (they drain), then NATS; nothing is left behind. The test suite drives
the same ``ServiceProcess`` class.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from baton.natsd import NatsServer, free_port
from baton.settings import DEFAULT_NATS_URL
from baton.urls import redact

MODULES = {
    "context-store": "services.context_store",
    "orchestrator": "services.orchestrator",
    "inference-worker": "services.inference_worker",
    "tool-worker": "services.tool_worker",
}


@dataclass
class ServiceProcess:
    """One Baton service in its own process group."""

    name: str
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self) -> ServiceProcess:
        if self.port == 0:
            self.port = free_port()
        env = {**os.environ, **self.env, "BATON_HTTP_PORT": str(self.port)}
        out = self.log_path.open("ab") if self.log_path else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", MODULES[self.name]],
            env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )  # fmt: skip
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"{self.name} exited with {code}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready in {timeout}s") from None
                time.sleep(0.2)

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole group. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Stack:
    data_dir: Path
    engine: str = "vllm"
    nats_url: str | None = None
    nats_port: int = 4222
    monitor_port: int = 8222
    http_port: int = 8080
    ready_timeout: float = 900.0
    services: list[ServiceProcess] = field(default_factory=list)
    nats: NatsServer | None = None

    def ports(self) -> list[tuple[int, str]]:
        """Every port this stack binds, with what binds it."""
        ours = [(self.http_port, "orchestrator HTTP"), (self.http_port + 1, "context-store HTTP"),
                (self.http_port + 2, "inference-worker HTTP")]  # fmt: skip
        if self.nats_url is None:
            ours = [(self.nats_port, "NATS"), (self.monitor_port, "NATS monitoring"), *ours]
        return ours

    def busy_ports(self) -> list[tuple[int, str]]:
        """The ports of ``ports()`` something else already holds on 127.0.0.1."""
        busy = []
        for port, what in self.ports():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    busy.append((port, what))
        return busy

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = self.nats_url
        if url is None:
            self.nats = NatsServer(
                self.data_dir / "nats", port=self.nats_port, monitor_port=self.monitor_port
            ).start()
            url = self.nats.url
        env = {
            "BATON_NATS_URL": url,
            "BATON_ENGINE": self.engine,
            "BATON_DATA_DIR": str(self.data_dir.resolve()),
        }
        self.services = [
            ServiceProcess("context-store", env, self.http_port + 1).start(),
            ServiceProcess("orchestrator", env, self.http_port).start(),
            ServiceProcess("inference-worker", env, self.http_port + 2).start(),
            ServiceProcess("tool-worker", env, self.http_port + 3).start(),
        ]
        return url

    def wait_ready(self) -> None:
        for svc in self.services:
            svc.wait_ready(self.ready_timeout)

    def stop(self) -> None:
        for svc in self.services:
            if svc.alive():
                assert svc.proc is not None
                svc.proc.send_signal(signal.SIGTERM)
        for svc in self.services:
            svc.terminate(timeout=30.0)
        if self.nats is not None:
            self.nats.stop()

    def run_forever(self) -> int:
        stop = False

        def on_signal(signum: int, _: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            url = self.start()
            monitor = f" (monitoring http://127.0.0.1:{self.monitor_port})" if self.nats else ""
            print(f"baton: NATS {url}{monitor}", flush=True)
            print(
                f"baton: starting services with engine={self.engine} "
                "(the first vLLM start builds the tiny model: allow a minute)",
                flush=True,
            )
            self.wait_ready()
            for svc in self.services:
                print(f"baton: {svc.name:<16} {svc.url}  (/healthz /readyz /metrics)", flush=True)
            api = f"http://127.0.0.1:{self.http_port}"
            nats_flag = "" if url == DEFAULT_NATS_URL else f" --nats-url {redact(url)}"
            api_flag = "" if api == "http://127.0.0.1:8080" else f" --api-url {api}"
            print(f"baton: API docs {api}/docs (OpenAI-compatible base URL {api}/v1)", flush=True)
            print(f"baton: try: baton submit chat 'hello' --tenant acme{nats_flag}", flush=True)
            print(f"baton:      baton tasks --tenant acme{api_flag}   (Ctrl-C stops everything)",
                  flush=True)  # fmt: skip
            while not stop:
                for svc in self.services:
                    if not svc.alive():
                        print(f"baton: {svc.name} exited; stopping", file=sys.stderr)
                        return 1
                time.sleep(0.3)
            return 0
        except RuntimeError as exc:
            print(f"baton: {exc}", file=sys.stderr)
            return 1
        finally:
            print("baton: stopping", flush=True)
            self.stop()
