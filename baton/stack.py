"""``baton up``: embedded NATS plus the services as child processes.

Each service is its own process (as in production), started with the same
environment plus ``BATON_NATS_URL`` carrying that service's own identity.
NATS runs with authentication on: the tenants of ``BATON_TENANTS`` (default
``acme``) each get an account, and their client URLs are written to
``<data-dir>/tenants/<tenant>.url`` (the operator's to ``operator.url``).
Ctrl-C (or SIGTERM) stops the services first (they drain), then NATS; nothing
is left behind. The test suite drives the same ``ServiceProcess`` class.
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

from baton import accounts
from baton.credentials import Credentials
from baton.natsd import NatsServer, ServerAuth, free_port
from baton.settings import parse_tenants
from baton.urls import redact

MODULES = {
    accounts.CONTEXT_STORE: "services.context_store",
    accounts.ORCHESTRATOR: "services.orchestrator",
    accounts.INFERENCE_WORKER: "services.inference_worker",
    accounts.TOOL_WORKER: "services.tool_worker",
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


def env_tenants() -> list[str]:
    """The tenants of ``BATON_TENANTS`` (default ``acme``)."""
    return parse_tenants(os.environ.get("BATON_TENANTS", "acme"))


def start_secure_nats(
    data_dir: Path, tenants: list[str], *, port: int, monitor_port: int | None
) -> NatsServer:
    """Start the embedded NATS with an account per tenant, its passwords
    those of ``data_dir``'s secrets (missing ones added), and write the
    tenants' and the operator's client URLs there."""
    creds = Credentials.load_or_create(data_dir, tenants)
    server = NatsServer(data_dir / "nats", port=port, monitor_port=monitor_port,
                        auth=ServerAuth(tenants, creds)).start()  # fmt: skip
    creds.write_urls(data_dir, tenants, "127.0.0.1", server.port)
    return server


@dataclass
class Stack:
    data_dir: Path
    engine: str = "vllm"
    nats_url: str | None = None
    nats_port: int = 4222
    monitor_port: int = 8222
    http_port: int = 8080
    ready_timeout: float = 900.0
    tenants: list[str] = field(default_factory=env_tenants)
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
        """Start NATS (unless ``nats_url``) and the services; returns the
        address of NATS (without credentials)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        base = {
            "BATON_ENGINE": self.engine,
            "BATON_DATA_DIR": str(self.data_dir.resolve()),
            "BATON_TENANTS": ",".join(self.tenants),
        }
        urls: dict[str, str]
        if self.nats_url is None:
            self.nats = start_secure_nats(self.data_dir, self.tenants, port=self.nats_port,
                                          monitor_port=self.monitor_port)  # fmt: skip
            url = self.nats.address
            urls = {name: self.nats.url_for(name) for name in MODULES}
        else:  # the caller's NATS, one identity for every service
            url = self.nats_url
            urls = dict.fromkeys(MODULES, url)
        ports = {accounts.ORCHESTRATOR: self.http_port, accounts.CONTEXT_STORE: self.http_port + 1,
                 accounts.INFERENCE_WORKER: self.http_port + 2,
                 accounts.TOOL_WORKER: self.http_port + 3}  # fmt: skip
        self.services = [
            ServiceProcess(name, {**base, "BATON_NATS_URL": urls[name]}, ports[name]).start()
            for name in MODULES
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
            print(f"baton: NATS {url}{monitor}, authentication on", flush=True)
            if self.nats is not None:
                where = self.data_dir / "tenants"
                print(f"baton: tenants {', '.join(self.tenants)}: client URLs in {where}/ "
                      f"(print one: baton tenant url {self.tenants[0]})", flush=True)  # fmt: skip
            print(
                f"baton: starting services with engine={self.engine} "
                "(the first vLLM start builds the tiny model: allow a minute)",
                flush=True,
            )
            self.wait_ready()
            for svc in self.services:
                print(f"baton: {svc.name:<16} {svc.url}  (/healthz /readyz /metrics)", flush=True)
            api = f"http://127.0.0.1:{self.http_port}"
            tenant = self.tenants[0]
            data_flag = "" if self.data_dir == Path(".data") else f" --data-dir {self.data_dir}"
            nats_flag = data_flag if self.nats is not None else f" --nats-url {redact(url)}"
            api_flag = "" if api == "http://127.0.0.1:8080" else f" --api-url {api}"
            print(f"baton: API docs {api}/docs (OpenAI-compatible base URL {api}/v1)", flush=True)
            print(f"baton: try: baton submit chat 'hello' --tenant {tenant}{nats_flag}", flush=True)
            print(f"baton:      baton tasks --tenant {tenant}{api_flag}"
                  "   (Ctrl-C stops everything)", flush=True)  # fmt: skip
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
