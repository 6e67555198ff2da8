"""``baton up``: embedded NATS plus the three services as child processes.

Each service is its own process (as in production), started with the same
environment plus ``BATON_NATS_URL``. Ctrl-C (or SIGTERM) stops the services
first (they drain), then NATS; nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from baton.natsd import NatsServer


@dataclass
class Child:
    name: str
    module: str
    port: int
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Stack:
    data_dir: Path
    engine: str = "vllm"
    nats_url: str | None = None
    nats_port: int = 4222
    http_port: int = 8080
    ready_timeout: float = 600.0
    children: list[Child] = field(default_factory=list)
    nats: NatsServer | None = None

    def _env(self, url: str, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BATON_NATS_URL=url,
            BATON_HTTP_PORT=str(port),
            BATON_ENGINE=self.engine,
            BATON_DATA_DIR=str(self.data_dir),
            BATON_LOG_JSON=env.get("BATON_LOG_JSON", "true"),
        )
        return env

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = self.nats_url
        if url is None:
            self.nats = NatsServer(
                self.data_dir / "nats", port=self.nats_port, monitor_port=8222
            ).start()
            url = self.nats.url
        self.children = [
            Child("context-store", "services.context_store", self.http_port + 1),
            Child("orchestrator", "services.orchestrator", self.http_port),
            Child("inference-worker", "services.inference_worker", self.http_port + 2),
        ]
        for c in self.children:
            c.proc = subprocess.Popen(
                [sys.executable, "-m", c.module],
                env=self._env(url, c.port),
                start_new_session=True,
            )
        return url

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        for c in self.children:
            while True:
                assert c.proc is not None
                if c.proc.poll() is not None:
                    raise RuntimeError(f"{c.name} exited with {c.proc.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{c.port}/readyz", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{c.name} not ready in {self.ready_timeout}s") from None
                    time.sleep(0.3)

    def stop(self, grace: float = 30.0) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
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
            print(
                f"baton: NATS {url} (monitoring http://127.0.0.1:8222)"
                if self.nats
                else f"baton: NATS {url}",
                flush=True,
            )
            print(
                f"baton: starting services (engine={self.engine}); the first vLLM start "
                "builds the tiny model and takes ~30 s",
                flush=True,
            )
            self.wait_ready()
            for c in self.children:
                print(
                    f"baton: {c.name:<16} http://127.0.0.1:{c.port}  (/healthz /readyz /metrics)",
                    flush=True,
                )
            print(
                f"baton: API http://127.0.0.1:{self.http_port}/docs — try: "
                "baton submit chat 'hello' --tenant acme   (Ctrl-C stops everything)",
                flush=True,
            )
            while not stop:
                for c in self.children:
                    assert c.proc is not None
                    if c.proc.poll() is not None:
                        print(
                            f"baton: {c.name} exited with {c.proc.returncode}; stopping",
                            file=sys.stderr,
                        )
                        return 1
                time.sleep(0.5)
            return 0
        except RuntimeError as exc:
            print(f"baton: {exc}", file=sys.stderr)
            return 1
        finally:
            print("baton: stopping", flush=True)
            self.stop()
