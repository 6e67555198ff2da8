"""``baton up``: embedded NATS plus the services as child processes.

Each service is its own process (as in production), started with the same
environment plus ``BATON_NATS_URL`` carrying that service's own identity;
NATS runs with authentication on and the tenants' and operator's files are
written under the data dir (``baton.credentials``). Ctrl-C (or SIGTERM), at
any moment, start-up included, stops the services first (ready ones drain; a
service still starting is killed after a few seconds), then NATS; children of
a ``baton up`` that is itself killed get SIGTERM from the kernel
(``baton.procs.die_with_parent``). The tests drive the same ``ServiceProcess``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from baton import accounts
from baton.credentials import Credentials
from baton.natsd import NatsServer, ServerAuth, free_port
from baton.procs import die_with_parent, port_free, port_holder
from baton.settings import parse_tenants
from baton.urls import redact

MODULES = {
    accounts.CONTEXT_STORE: "services.context_store",
    accounts.ORCHESTRATOR: "services.orchestrator",
    accounts.INFERENCE_WORKER: "services.inference_worker",
    accounts.TOOL_WORKER: "services.tool_worker",
}


class Interrupted(Exception):
    """Start-up was stopped (Ctrl-C) before every service was ready."""


@dataclass
class ServiceProcess:
    """One Baton service in its own process group. ``die_with_parent``: the
    kernel sends it SIGTERM when the process that started it dies (set it
    only when starting from a main thread, as ``baton up`` does)."""

    name: str
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    die_with_parent: bool = False
    ready: bool = False

    def start(self) -> ServiceProcess:
        if self.port == 0:
            self.port = free_port()
        env = {**os.environ, **self.env, "BATON_HTTP_PORT": str(self.port)}
        out = self.log_path.open("ab") if self.log_path else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", MODULES[self.name]],
            env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True, preexec_fn=die_with_parent if self.die_with_parent else None,
        )  # fmt: skip
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(
        self, timeout: float = 60.0, stopping: Callable[[], bool] = lambda: False
    ) -> ServiceProcess:
        """Poll ``/readyz`` until ready; ``Interrupted`` as soon as ``stopping()``."""
        deadline = time.monotonic() + timeout
        while True:
            if stopping():
                raise Interrupted(f"stopped while {self.name} was starting")
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"{self.name} exited with {code}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1):
                    self.ready = True
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready in {timeout}s") from None
                time.sleep(0.2)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to the service (not its children: it stops them itself)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signum)

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the whole group; any
        child left in the group after the service exits is killed too.
        Returns the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or an OOM killer would."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _say(*lines: str) -> None:
    """Lines of ``baton up``'s console, shown at once."""
    for line in lines:
        print(f"baton: {line}", flush=True)


def env_tenants() -> list[str]:
    """The tenants of ``BATON_TENANTS`` (default ``acme``)."""
    return parse_tenants(os.environ.get("BATON_TENANTS", "acme"))


def start_secure_nats(
    data_dir: Path,
    tenants: list[str],
    *,
    port: int,
    monitor_port: int | None,
    die_with_parent: bool = False,
) -> NatsServer:
    """Start the embedded NATS with an account per tenant, its passwords
    those of ``data_dir``'s secrets (missing ones added), and write the
    tenants' and the operator's client URLs there. A tenant deleted at run
    time (``baton tenant delete``) is left out."""
    creds = Credentials.load_or_create(data_dir, tenants)
    tenants = creds.live(tenants)
    server = NatsServer(data_dir / "nats", port=port, monitor_port=monitor_port,
                        auth=ServerAuth(tenants, creds),
                        die_with_parent=die_with_parent).start()  # fmt: skip
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
    api_keys: bool = True
    # Seconds a service still starting gets to exit on Ctrl-C before it is
    # killed (a ready one drains for up to drain_timeout).
    start_grace: float = 3.0
    drain_timeout: float = 30.0
    services: list[ServiceProcess] = field(default_factory=list)
    nats: NatsServer | None = None
    skipped: list[str] = field(default_factory=list)  # deleted tenants of BATON_TENANTS

    def _drop_deleted(self) -> None:
        """Leave out the tenants ``baton tenant delete`` deleted: a restart
        must not make them again (keys, account, streams)."""
        creds = Credentials.load_or_create(self.data_dir, [])
        self.skipped = [t for t in self.tenants if t not in creds.live(self.tenants)]
        self.tenants = creds.live(self.tenants)
        if not self.tenants:
            gone = f"every tenant of BATON_TENANTS ({', '.join(self.skipped)}) was deleted"
            anew = "list another, or make one anew with `baton tenant create`"
            raise RuntimeError(f"{gone} (`baton tenant delete`): {anew}")

    def _starting(self, url: str) -> list[str]:
        """What ``run_forever`` says while the services start."""
        lines = []
        for t in self.skipped:
            deleted = f"tenant {t} of BATON_TENANTS was deleted (`baton tenant delete`)"
            lines.append(f"{deleted}: skipped (`baton tenant create {t}` makes it anew)")
        monitor = f" (monitoring http://127.0.0.1:{self.monitor_port})" if self.nats else ""
        lines.append(f"NATS {url}{monitor}, authentication on")
        first, tenants = self.tenants[0], ", ".join(self.tenants)
        if self.nats is not None:
            where = f"client URLs in {self.data_dir / 'tenants'}/"
            lines.append(f"tenants {tenants}: {where} (print one: baton tenant url {first})")
        if self.api_keys:
            keys = f"{self.data_dir}/tenants/<tenant>.key and {self.data_dir}/operator.key"
            lines.append(f"HTTP API keys in {keys} (print one: baton tenant key {first})")
        else:
            every = "every local process can read and act on every tenant"
            lines.append(f"WARNING: the HTTP API runs WITHOUT API keys (--no-api-keys): {every}")
        vllm = "(vLLM loads the model: allow a minute; Ctrl-C stops)"
        return [*lines, f"starting services with engine={self.engine} {vllm}"]

    def ports(self) -> list[tuple[int, str]]:
        """Every port this stack binds, with what binds it."""
        ours = [
            (self.http_port, "orchestrator HTTP"),
            (self.http_port + 1, "context-store HTTP"),
            (self.http_port + 2, "inference-worker HTTP"),
        ]
        if self.nats_url is None:
            ours = [(self.nats_port, "NATS"), (self.monitor_port, "NATS monitoring"), *ours]
        return ours

    def busy_ports(self) -> list[tuple[int, str, str | None]]:
        """The ports of ``ports()`` a server could not bind on 127.0.0.1 now,
        with what binds it here and who holds it (when it can be told)."""
        return [
            (port, what, port_holder(port)) for port, what in self.ports() if not port_free(port)
        ]

    def start(self) -> str:
        """Start NATS (unless ``nats_url``) and the services; returns the
        address of NATS (without credentials)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._drop_deleted()
        base = {
            "BATON_ENGINE": self.engine,
            "BATON_DATA_DIR": str(self.data_dir.resolve()),
            "BATON_TENANTS": ",".join(self.tenants),
        }
        if self.api_keys:
            creds = Credentials.load_or_create(self.data_dir, self.tenants)
            creds.write_api_keys(self.data_dir, self.tenants)
            base["BATON_API_KEYS"] = json.dumps(creds.api_key_scopes(self.tenants))
        else:
            base["BATON_ALLOW_NO_API_KEYS"] = "true"
        urls: dict[str, str]
        if self.nats_url is None:
            self.nats = start_secure_nats(self.data_dir, self.tenants, port=self.nats_port,
                                          monitor_port=self.monitor_port,
                                          die_with_parent=True)  # fmt: skip
            url = self.nats.address
            urls = {name: self.nats.url_for(name) for name in MODULES}
            # The operator's /v1/tenants API uses the keys `baton up` keeps here.
            base["BATON_TENANT_ADMIN_DIR"] = str(self.data_dir.resolve())
        else:  # the caller's NATS, one identity for every service
            url = self.nats_url
            urls = dict.fromkeys(MODULES, url)
        ports = {
            accounts.ORCHESTRATOR: self.http_port,
            accounts.CONTEXT_STORE: self.http_port + 1,
            accounts.INFERENCE_WORKER: self.http_port + 2,
            accounts.TOOL_WORKER: self.http_port + 3,
        }
        self.services = [
            ServiceProcess(
                name, {**base, "BATON_NATS_URL": urls[name]}, ports[name], die_with_parent=True
            ).start()
            for name in MODULES
        ]
        return url

    def wait_ready(self, stopping: Callable[[], bool] = lambda: False) -> None:
        for svc in self.services:
            svc.wait_ready(self.ready_timeout, stopping)

    def stop(self) -> None:
        """SIGTERM every service at once; a ready one may drain for
        ``drain_timeout``, one still starting has ``start_grace``; then
        their groups are killed and NATS stops."""
        for svc in self.services:
            svc.signal(signal.SIGTERM)
        for svc in self.services:
            svc.terminate(timeout=self.drain_timeout if svc.ready else self.start_grace)
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
            _say(*self._starting(url))
            self.wait_ready(lambda: stop)
            for svc in self.services:
                print(f"baton: {svc.name:<16} {svc.url}  (/healthz /readyz /metrics)", flush=True)
            api = f"http://127.0.0.1:{self.http_port}"
            tenant = self.tenants[0]
            data_flag = "" if self.data_dir == Path(".data") else f" --data-dir {self.data_dir}"
            nats_flag = data_flag if self.nats is not None else f" --nats-url {redact(url)}"
            api_flag = "" if api == "http://127.0.0.1:8080" else f" --api-url {api}"
            print(f"baton: API docs {api}/docs (OpenAI-compatible base URL {api}/v1)", flush=True)
            print(f"baton: try: baton submit chat 'hello' --tenant {tenant}{nats_flag}", flush=True)
            _say(f"     baton tasks --tenant {tenant}{api_flag}   (Ctrl-C stops everything)")
            while not stop:
                for svc in self.services:
                    if not svc.alive():
                        print(f"baton: {svc.name} exited; stopping", file=sys.stderr)
                        return 1
                time.sleep(0.3)
            return 0
        except Interrupted:
            return 0
        except RuntimeError as exc:
            print(f"baton: {exc}", file=sys.stderr)
            return 1
        finally:
            print("baton: stopping", flush=True)
            self.stop()
