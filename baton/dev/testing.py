"""A local Baton for benchmarks and tests: a real nats-server with Baton's
accounts, the services as processes, and a client with no Baton code.

``secure_nats`` builds the embedded server as in production (accounts for
``TEST_TENANTS``, one identity per service, JetStream encrypted at rest);
``LocalStack`` starts each service with its own identity; ``Client`` speaks
the public contract with nats-py and msgpack only; ``submit_job`` and
``collect_results`` play the orchestrator's part on the bus for a worker under
test. Importable from production code (``bench/`` uses it); nothing here
belongs to pytest — the test-only pieces (Docker-backed NATS, asserting HTTP
helpers) live in ``tests/harness.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgpack
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from baton import accounts
from baton.bus import Bus
from baton.credentials import Credentials
from baton.natsd import NatsServer, ServerAuth
from baton.stack import MODULES, ServiceProcess
from baton.urls import split_creds
from proto import codec, subjects
from proto.messages import (
    ChatMessage,
    ContextAppend,
    ContextAppendReply,
    InferenceJob,
    InferenceResult,
)
from proto.streams import EVENTS, RESULTS, ConsumerSpec

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
    # The shared test stack speaks HTTP without keys; tests of the keys start
    # their own orchestrator with BATON_API_KEYS.
    "BATON_ALLOW_NO_API_KEYS": "true",
}


# A workflow whose second step fails in the inference layer: it runs on pool
# "edge", served by ``refusing_worker`` (the ``openai`` engine in front of a
# ``RefusingModelServer``). For the run console's tests and benchmark.
INFERENCE_FAILURE_WORKFLOW = """
name: broken
description: The second step's model server refuses its prompt.
agents:
  first: {role: first, system: You answer., max_tokens: 16}
  second: {role: second, system: You answer again., max_tokens: 16, pool: edge}
steps:
  - id: first
    agent: first
  - id: second
    agent: second
"""

# Debian's chromium as the console's tests and benchmark launch it (headless,
# no network of its own); Playwright drives it, never `playwright install`.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync")  # fmt: skip


def secure_nats(
    store_dir: Path, tenants: tuple[str, ...] = TEST_TENANTS, *, encrypt: bool = True, **kw: Any
) -> NatsServer:
    """A nats-server with Baton's accounts (not started); ``encrypt=False``
    leaves the store readable, for tests that prove erasure from raw files."""
    creds = Credentials.load_or_create(store_dir, list(tenants))
    return NatsServer(store_dir, auth=ServerAuth(list(tenants), creds, encrypt=encrypt), **kw)


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
        """The address with ``identity``'s ``.creds`` (operator mode, as the
        embedded server)."""
        return self.creds.creds_url(identity, self.host, self.port)


async def connect_nats(url: str, **kw: Any) -> nats.NATS:
    """nats-py's ``connect`` for a URL that may carry ``?creds=`` (Baton's
    form, ``baton.urls.split_creds``): plain nats-py with ``user_credentials``."""
    servers, creds = split_creds(url)
    if creds is not None:
        kw.setdefault("user_credentials", creds)
    return await nats.connect(servers, **kw)


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

    def start(
        self,
        workers: int = 1,
        tool_workers: int = 0,
        *,
        workflows: Mapping[str, str] | None = None,
        pools: Mapping[str, Mapping[str, float]] | None = None,
        **orchestrator_env: str,
    ) -> LocalStack:
        """A context store, an orchestrator, ``workers`` simulator workers and
        ``tool_workers`` tool workers, all ready. Every orchestrator of the
        stack (this one and any started later) runs ``workflows`` (file name
        -> YAML) besides the built-in ones and places on the ``pools``
        catalogue; this one also has ``orchestrator_env``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if workflows:
            flows = self.workdir / "workflows"
            flows.mkdir(exist_ok=True)
            for name, text in workflows.items():
                (flows / name).write_text(text)
            self.env["BATON_WORKFLOWS_DIR"] = str(flows)
        if pools is not None:
            self.env["BATON_POOLS"] = json.dumps(pools)
        started = [self.service("context-store"), self.service("orchestrator", **orchestrator_env)]
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
        """SIGTERM to every process at once, then each waited for (and its
        group killed) in turn: the drains overlap instead of queueing."""
        for p in self.procs:
            p.signal()
        for p in self.procs:
            p.terminate(timeout=20)

    def logs(self) -> str:
        return "\n".join(p.log_path.read_text() for p in self.procs if p.log_path)


class _Refusing(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # /health, /metrics: up and idle
        self._answer(200 if self.path in ("/health", "/metrics") else 404, b"")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/chat/completions":
            return self._answer(404, b"{}")  # no /tokenize: the engine estimates
        body = {"error": {"message": "This model's maximum context length is 2048 tokens. "
                          "However, your prompt contains at least 2049 input tokens.",
                          "type": "BadRequestError", "code": 400}}  # fmt: skip
        self._answer(400, json.dumps(body).encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class RefusingModelServer:
    """A stand-in for an OpenAI-compatible model server (a simulator, named
    as one) that refuses every prompt the way vLLM does when it exceeds the
    model's context: HTTP 400 "maximum context length". A worker with the
    real ``openai`` engine in front of it fails its steps in the inference
    layer (``prompt_too_long``)."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def refusing_worker(stack: LocalStack, server: RefusingModelServer) -> ServiceProcess:
    """A worker on pool "edge" whose engine is ``server`` (started, not
    waited for)."""
    return stack.worker(BATON_POOL="edge", BATON_ENGINE="openai",
                        BATON_OPENAI_BASE_URL=server.url, BATON_MAX_MODEL_LEN="2048")  # fmt: skip


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
        return cls(await connect_nats(url, **kw), tenant)

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
        self, tenant: str, task_id: str, *, timeout: float = 30.0, until_terminal: bool = True,
        until: Callable[[list[dict[str, Any]]], bool] | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Replay a task's events from the start until a terminal one (or,
        ``until`` given, until ``until(events)`` holds: no need to wait the
        timeout out for a state the task reached; at the timeout, what came)."""
        got: list[dict[str, Any]] = []
        sub = await self.js.subscribe(
            f"baton.events.{tenant}.{task_id}",
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg = await sub.next_msg(timeout=timeout)
                    ev = msgpack.unpackb(msg.data)
                    got.append(ev)
                    if until is not None and until(got):
                        return got
                    if until_terminal and ev["type"] in ("completed", "failed"):
                        return got
        except TimeoutError:
            if until_terminal and until is None:
                raise AssertionError(f"no terminal event for {task_id}; got {got}") from None
            return got
        finally:
            await sub.unsubscribe()

    async def run(self, workflow: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """Submit and return the terminal event."""
        await self.publish(workflow, body, msg_id=body.get("task_id"))
        events = await self.events(body["tenant"], body["task_id"], **kw)
        return events[-1]

    async def follow(self, tenant: str) -> Follower:
        """One consumer on ``tenant``'s events from now on, for many ``run``s
        (``events`` opens a consumer per task: a stream lookup, a create and,
        on the server, the consumer's advisories and its deletion each time)."""
        follower = Follower(self, tenant)
        follower.sub = await self.js.subscribe(
            f"baton.events.{tenant}.>", stream=EVENTS.name, ordered_consumer=True,
            cb=follower.on_event, config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        )  # fmt: skip
        return follower

    async def close(self) -> None:
        await self.nc.close()


class Follower:
    """A tenant's terminal events through one consumer (``Client.follow``);
    only tasks submitted after it started are seen."""

    def __init__(self, client: Client, tenant: str) -> None:
        self.client = client
        self.tenant = tenant
        self.sub: Any = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def on_event(self, msg: Any) -> None:
        ev = msgpack.unpackb(msg.data)
        if ev.get("type") in ("completed", "failed"):
            task_id = msg.subject[len(f"baton.events.{self.tenant}.") :]
            fut = self._waiting.pop(task_id, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)

    async def run(
        self, workflow: str, body: dict[str, Any], *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Submit (``body["tenant"]`` is the follower's) and return the terminal event."""
        task_id = body["task_id"]
        fut = asyncio.get_running_loop().create_future()
        self._waiting[task_id] = fut
        try:
            await self.client.publish(workflow, body, msg_id=task_id)
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise AssertionError(f"no terminal event for {task_id}") from None
        finally:
            self._waiting.pop(task_id, None)

    async def close(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()


def http_get(url: str, headers: dict[str, str] | None = None) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return str(r.read().decode())


def http_json(url: str, headers: dict[str, str] | None = None) -> Any:
    return json.loads(http_get(url, headers))


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


async def submit_job(
    bus: Bus,
    tenant: str,
    text: str,
    *,
    max_tokens: int,
    pool: str = "default",
    session: str | None = None,
    system: str | None = "You are terse.",
) -> InferenceJob:
    """Append ``text`` to a session and publish a job pointing at it (the
    orchestrator's part, for a worker under test)."""
    session = session or uid("s")
    reply = await bus.request(
        subjects.context_api("append", tenant),
        ContextAppend(tenant=tenant, session=session, msg_id=uid("m"),
                      messages=[ChatMessage(role="user", content=text)], system=system),
        ContextAppendReply,
    )  # fmt: skip
    if reply.ref is None:
        raise RuntimeError(f"context append refused: {reply.error}")
    job = InferenceJob(
        job_id=uid("j"), task_id=uid(), tenant=tenant, session=session, workflow="test",
        step="s1", agent="a", ref=reply.ref, max_tokens=max_tokens, published_at=time.time(),
    )  # fmt: skip
    await bus.publish(subjects.job(pool), job, msg_id=job.job_id, task_id=job.task_id)
    return job


async def next_turns(sub: Any, n: int, timeout: float = 600.0) -> list[InferenceResult]:
    """The next ``n`` model turns' results on ``sub``, a core subscription to
    a task's results (``subjects.result``); a warm's result is not a turn."""
    got: list[InferenceResult] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            res = codec.decode((await sub.next_msg(timeout=timeout)).data, InferenceResult)
            if not res.warm:
                got.append(res)
    return got


async def collect_results(bus: Bus, tenant: str, n: int, timeout: float) -> list[InferenceResult]:
    """Take ``n`` results for ``tenant`` off the results work queue."""
    spec = ConsumerSpec(stream=RESULTS.name, durable=f"collect-{tenant}",
                        filter_subject=f"{subjects.RESULTS}.{tenant}.>", ack_wait=30.0,
                        max_deliver=5)  # fmt: skip
    await bus.ensure_consumer(spec)
    puller = await bus.puller(spec)
    got: list[InferenceResult] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(got)} of {n} results within {timeout}s")
            for d in await puller.fetch(n - len(got), min(1.0, left)):
                got.append(d.decode(InferenceResult))
                await d.ack_sync()  # the consumer is deleted next: no ack may be in flight
    finally:
        # Work-queue streams allow one consumer per filter: delete it now.
        await puller.stop()
        await bus.delete_consumer(spec)
    return got
