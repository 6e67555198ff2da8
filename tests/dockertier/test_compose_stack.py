"""The Docker tier: the compose stack from `make images`, brought up by the
same script as `make compose-up`, used as a user would (the README's plain
client with the tenant's standard .creds file, a research task, a tenant
created through the orchestrator's /v1/tenants from its tenant-admin bundle), NATS in
operator mode (passwords and anonymous clients refused, a tenant confined
to its own subjects), Prometheus evaluating the project's alert rules
against the live services, and `down` leaving nothing behind.

Runs only with `-m docker` and a Docker daemon (`make test-docker` starts one).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton import jwt
from baton.credentials import read_url
from baton.dev.testing import Client, connect_nats
from baton.natsd import free_port
from tests.harness import docker_available

ROOT = Path(__file__).parents[2]
STACK = ROOT / "deploy" / "compose" / "stack.sh"
README = ROOT / "README.md"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not docker_available(), reason="no Docker daemon answers"),
    pytest.mark.timeout(900),
]


class Compose:
    def __init__(self, data: Path) -> None:
        self.project = f"baton-ci-{uuid.uuid4().hex[:6]}"
        self.ports = {name: free_port() for name in
                      ("NATS", "NATS_MONITOR", "CONTEXT", "ORCHESTRATOR", "PROMETHEUS")}  # fmt: skip
        self.env = os.environ | {
            "BATON_COMPOSE_DATA": str(data),
            "BATON_COMPOSE_PROJECT": self.project,
            "BATON_COMPOSE_BUILD": os.environ.get("BATON_COMPOSE_BUILD", "0"),
            **{f"BATON_COMPOSE_{k}_PORT": str(v) for k, v in self.ports.items()},
        }
        self.data = data
        self.up_seconds = 0.0

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(STACK), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    def tenant_url(self, tenant: str) -> str:
        """The tenant's address with its .creds file (Baton's ``?creds=`` form)."""
        return read_url(self.data, tenant)

    def prometheus(self, path: str) -> dict:
        url = f"http://127.0.0.1:{self.ports['PROMETHEUS']}{path}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())["data"]  # type: ignore[no-any-return]

    def docker(self, *args: str) -> str:
        return subprocess.run(["docker", *args], capture_output=True, text=True, check=True,
                              timeout=60).stdout  # fmt: skip

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: self.docker(*cmd, "--filter", label, "-q").split()
                for kind, cmd in (("containers", ["ps", "-a"]), ("networks", ["network", "ls"]),
                                  ("volumes", ["volume", "ls"]))}  # fmt: skip


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    c = Compose(tmp_path_factory.mktemp("compose"))
    t0 = time.monotonic()
    up = c.run("up")
    c.up_seconds = time.monotonic() - t0
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        print(f"\ncompose up: {c.up_seconds:.1f}s", file=sys.stderr)
        yield c
    finally:
        down = c.run("down", timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]


def test_the_readme_client_runs_against_the_stack(compose: Compose) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    # The client reads acme's address and .creds from the files `make up`
    # writes; compose writes the same files under its own data directory.
    url_file = compose.data / "tenants" / "acme.url"
    creds_file = compose.data / "tenants" / "acme.creds"
    assert url_file.read_text().strip() == f"nats://127.0.0.1:{compose.ports['NATS']}"
    assert "BEGIN NATS USER JWT" in creds_file.read_text()
    assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
    source = code.group(1).replace(".data/tenants/acme.url", str(url_file))
    source = source.replace(".data/tenants/acme.creds", str(creds_file))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "'type': 'completed'" in out.stdout and "'cost_usd'" in out.stdout
    print(
        f"\ncompose up to first completed task: {compose.up_seconds + time.monotonic() - t0:.1f}s",
        file=sys.stderr,
    )


async def test_a_research_task_completes_on_the_stack(compose: Compose) -> None:
    client = await Client.connect(compose.tenant_url("demo"), tenant="demo")
    try:
        task = {"tenant": "demo", "task_id": uuid.uuid4().hex, "input": "design a cache"}
        done = await client.run("research", task, timeout=600)
    finally:
        await client.close()
    assert done["type"] == "completed", done
    assert done["usage"]["completion_tokens"] > 0


def _operator_key(compose: Compose) -> str:
    """The operator's HTTP API key, as `stack.sh` generated it (secrets.env)."""
    env = (compose.data / "secrets.env").read_text()
    found = re.search(r"^BATON_API_KEYS='(.*)'$", env, re.M)
    assert found is not None, "no BATON_API_KEYS in secrets.env"
    (key,) = [k for k, scope in json.loads(found.group(1)).items() if scope == "*"]
    return key


async def test_the_operator_creates_a_tenant_over_http_that_runs_a_task(
    compose: Compose, tmp_path: Path
) -> None:
    """`POST /v1/tenants` on the compose orchestrator, which signs from the
    tenant-admin bundle alone (no operator identity key in the container):
    the new tenant's .creds submits a task that completes."""
    bundle = json.loads((compose.data / "tenant-admin" / "secrets" / "nats.json").read_text())
    assert bundle["bundle"] is True and "operator" not in bundle["nkeys"]
    tenant = f"dock{uuid.uuid4().hex[:6]}"
    url = f"http://127.0.0.1:{compose.ports['ORCHESTRATOR']}/v1/tenants"
    req = urllib.request.Request(url, data=json.dumps({"tenant": tenant}).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {_operator_key(compose)}",
                                          "Content-Type": "application/json"})  # fmt: skip
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, body = r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    assert status == 201, (status, body)
    creds = tmp_path / f"{tenant}.creds"
    creds.write_text(body["creds"])
    creds.chmod(0o600)
    client = await Client.connect(f"nats://127.0.0.1:{compose.ports['NATS']}?creds={creds}",
                                  tenant=tenant)  # fmt: skip
    try:
        task = {"tenant": tenant, "task_id": uuid.uuid4().hex, "input": "hi"}
        done = await client.run("chat", task, timeout=600)
    finally:
        await client.close()
    assert done["type"] == "completed", done
    print(f"\ncompose: POST /v1/tenants -> first completed task {time.monotonic() - t0:.1f}s",
          file=sys.stderr)  # fmt: skip


async def test_nats_runs_in_operator_mode_and_refuses_passwords(compose: Compose) -> None:
    import nats.errors

    address = f"nats://127.0.0.1:{compose.ports['NATS']}"
    monitor = f"http://127.0.0.1:{compose.ports['NATS_MONITOR']}"
    with urllib.request.urlopen(f"{monitor}/varz", timeout=5) as r:
        varz = json.loads(r.read())
    assert varz["trusted_operators_claim"], "no operator: the server is not in operator mode"
    # A user and password (the old configuration), anonymous, acme's JWT
    # with another key's seed: refused.
    forged = compose.data / "forged.creds"
    text = (compose.data / "tenants" / "acme.creds").read_text()
    (seed,) = re.findall(r"^SU[A-Z2-7]+$", text, re.M)
    forged.write_text(text.replace(seed, jwt.new_seed(jwt.USER)))
    for url, kw in [(f"nats://acme:password@127.0.0.1:{compose.ports['NATS']}", {}),
                    (address, {}), (address, {"user_credentials": str(forged)})]:  # fmt: skip
        with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
            await asyncio.wait_for(connect_nats(url, allow_reconnect=False, **kw), 10)
    # The tenant's own .creds works, inside its own subjects only.
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await connect_nats(compose.tenant_url("acme"), error_cb=on_error, allow_reconnect=False)
    try:
        await nc.subscribe("baton.events.demo.>")  # another tenant's events
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await nc.close()
    assert any("permissions violation" in str(e).lower() for e in errors), errors


def test_prometheus_evaluates_the_rules_against_the_live_services(compose: Compose) -> None:
    # Every target up and every rule group evaluated without error.
    deadline = time.monotonic() + 120
    while True:
        targets = compose.prometheus("/api/v1/targets")["activeTargets"]
        groups = compose.prometheus("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if (len(targets) >= 3 and all(t["health"] == "up" for t in targets)
                and rules and all(r["health"] == "ok" and r.get("lastEvaluation", "0001").startswith("2")
                                  for r in rules)):  # fmt: skip
            break
        assert time.monotonic() < deadline, (targets, rules)
        time.sleep(2)
    assert sum(r["type"] == "alerting" for r in rules) >= 10
    # A rule that goes from inactive to pending on the live stack: freeze the
    # worker (no heartbeats, no restart) and BatonWorkerHeartbeatStale triggers.
    (worker,) = compose.docker("ps", "-q", "--filter",
                               f"label=com.docker.compose.project={compose.project}",
                               "--filter", "label=com.docker.compose.service=inference-worker").split()  # fmt: skip
    compose.docker("pause", worker)
    try:
        deadline = time.monotonic() + 180
        while True:
            alerts = compose.prometheus("/api/v1/alerts")["alerts"]
            stale = [a for a in alerts if a["labels"]["alertname"] == "BatonWorkerHeartbeatStale"]
            if stale and stale[0]["state"] in ("pending", "firing"):
                break
            assert time.monotonic() < deadline, alerts
            time.sleep(3)
    finally:
        compose.docker("unpause", worker)


def test_down_leaves_no_container_network_or_volume(compose: Compose) -> None:
    assert all(compose.leftovers().values())  # the stack is up: something to remove
    down = compose.run("down", timeout=300)
    assert down.returncode == 0, down.stderr[-2000:]
    assert compose.leftovers() == {"containers": [], "networks": [], "volumes": []}
    assert not (compose.data / "tenants").exists()
