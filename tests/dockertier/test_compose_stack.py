"""The Docker tier: the compose stack from `make images`, brought up by the
same script as `make compose-up`, used as a user would (the README's plain
client, a research task), Prometheus evaluating the project's alert rules
against the live services, and `down` leaving nothing behind.

Runs only with `-m docker` and a Docker daemon (`make test-docker` starts one).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.dev.testing import Client
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
        return (self.data / "tenants" / f"{tenant}.url").read_text().strip()

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
    # The client reads acme's URL from the file `make up` writes; compose writes its own.
    url_file = compose.data / "tenants" / "acme.url"
    assert url_file.read_text().startswith("nats://acme:")  # credentials, not an open bus
    source = code.group(1).replace(".data/tenants/acme.url", str(url_file))
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
