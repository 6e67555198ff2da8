"""A live alert, end to end: the real Prometheus (Debian's binary) scrapes a
local Baton stack, an OOM is injected through the simulator engine, and the
OOM alert goes to firing in Prometheus' own API."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from baton.dev.testing import Client, LocalStack, uid
from baton.natsd import NatsServer, free_port

RULES = Path(__file__).parents[1] / "deploy" / "prometheus" / "rules" / "baton.rules.yml"
DOCS = "https://git.example/baton/blob/v1/"  # the external label runbook links start with

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is not installed (apt-get install prometheus; .ci/run does)",
)


def _alerts(port: int) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5) as r:
        return json.loads(r.read())["data"]["alerts"]  # type: ignore[no-any-return]


async def test_an_injected_oom_fires_the_oom_alert_in_prometheus(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    stack = LocalStack(own_nats, tmp_path / "stack").start()
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                   "external_labels": {"baton_docs_url": DOCS}},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "baton",
            "static_configs": [{"targets": [f"127.0.0.1:{p.port}" for p in stack.procs]}],
        }],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = await Client.connect(own_nats.url)
    try:
        for _ in range(120):  # until Prometheus has scraped the OOM counter at zero
            try:
                if _q(port, "baton_worker_oom_total == 0"):
                    break
            except OSError:
                pass
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("Prometheus never scraped the worker")
        await asyncio.sleep(2)
        oom = [a for a in _alerts(port) if a["labels"]["alertname"] == "BatonGPUOutOfMemory"]  # type: ignore[index]
        assert oom == []
        worker = next(p for p in stack.procs if p.name == "inference-worker")
        req = urllib.request.Request(f"{worker.url}/debug/inject-oom?count=1", b"", method="POST")
        urllib.request.urlopen(req, timeout=5).close()
        done = await client.run("chat", {"tenant": "acme", "input": "hi", "task_id": uid()})
        assert done["type"] == "completed"  # survived the OOM
        for _ in range(60):
            firing = [a for a in _alerts(port)
                      if a["labels"]["alertname"] == "BatonGPUOutOfMemory"  # type: ignore[index]
                      and a["state"] == "firing"]  # fmt: skip
            if firing:
                break
            await asyncio.sleep(0.5)
        assert firing, _alerts(port)
        assert firing[0]["labels"]["pool"] == "default"  # type: ignore[index]
        # The runbook link is absolute under the external label.
        url = firing[0]["annotations"]["runbook_url"]  # type: ignore[index]
        assert url == f"{DOCS}docs/deploy.md#batongpuoutofmemory-critical"
    finally:
        await client.close()
        prom.terminate()
        prom.wait(10)
        stack.stop()


def _q(port: int, expr: str) -> object:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.request.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]
