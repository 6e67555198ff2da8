"""Each running Baton service exports exactly its own metric families, as
deploy/metrics.txt lists them (the names alert rules and the dashboard may
use), each with series; no ``_created`` series; HTTP metrics by route."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import defaultdict
from pathlib import Path

from baton.dev.testing import Client, LocalStack, metric, uid

CATALOGUE = Path(__file__).parents[1] / "deploy" / "metrics.txt"
# Only exported with series where pynvml finds a GPU (tests/test_gpu_metrics.py, fake NVML).
GPU_ONLY = {"baton_worker_gpu_memory_used_bytes", "baton_worker_gpu_memory_free_bytes"}


def catalogue() -> dict[str, set[str]]:
    """{service: its metric names} from ``<service> <name>`` lines."""
    by_service: dict[str, set[str]] = defaultdict(set)
    for line in CATALOGUE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            service, name = line.split()
            by_service[service].add(name)
    return dict(by_service)


def _scrape(url: str) -> tuple[set[str], set[str], str]:
    """The baton_* families a /metrics declares, the names that have series, the text."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    families = {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE baton_")}
    names = {re.split(r"[{ ]", ln, maxsplit=1)[0] for ln in text.splitlines()
             if ln and not ln.startswith("#")}  # fmt: skip
    sampled = names | {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    return families, sampled, text


async def test_each_running_service_exports_exactly_its_catalogued_metrics(
    stack: LocalStack, client: Client
) -> None:
    done = await client.run("chat", {"tenant": "hooli", "input": "hi", "task_id": uid()})
    assert done["type"] == "completed"
    wanted = catalogue()
    assert {p.name for p in stack.procs} <= set(wanted)
    for proc in stack.procs:
        own = wanted[proc.name]
        for _ in range(40):  # gauges fed by periodic loops (heartbeats, backlog) need a beat
            families, sampled, text = _scrape(proc.url)
            if not own - GPU_ONLY - sampled:
                break
            await asyncio.sleep(0.25)
        assert families == own, (proc.name, families ^ own)  # nobody else's families
        assert own - GPU_ONLY - sampled == set(), proc.name  # every own one with series
        assert "_created" not in text, proc.name


def test_http_metrics_are_by_route_and_status_class(stack: LocalStack) -> None:
    url = stack.orchestrator.url
    with urllib.request.urlopen(f"{url}/healthz", timeout=5):
        pass
    labels = {"handler": "/healthz", "method": "GET", "status": "2xx"}
    assert metric(url, "baton_http_requests_total", **labels) >= 1
    assert metric(url, "baton_http_request_duration_seconds_count", handler="/healthz") >= 1
    assert metric(url, "baton_http_requests_total", handler="/metrics") == 0  # not counted


async def test_a_research_task_feeds_the_waterfall_latency_lag_and_cost_metrics(
    stack: LocalStack, client: Client
) -> None:
    by_name = {p.name: p.url for p in stack.procs}
    orch, worker, tools = (by_name[n] for n in ("orchestrator", "inference-worker", "tool-worker"))

    def counts() -> dict[str, float]:
        return {
            "queue": metric(orch, "baton_step_phase_seconds_count", phase="queue", workflow="research"),
            "decode": metric(orch, "baton_step_phase_seconds_count", phase="decode", workflow="research"),
            "tool": metric(orch, "baton_step_phase_seconds_count", phase="tool", workflow="research"),
            "cost": metric(orch, "baton_tenant_cost_usd_total", tenant="wonka"),
            "ttft": metric(worker, "baton_worker_ttft_seconds_count", model="sim"),
            "itl": metric(worker, "baton_worker_inter_token_latency_seconds_count", model="sim"),
            "lag": metric(worker, "baton_worker_token_stream_lag_seconds_count"),
            "tool_queue": metric(tools, "baton_tool_queue_wait_seconds_count"),
        }  # fmt: skip

    before = counts()
    done = await client.run("research", {"tenant": "wonka", "input": "sort numbers",
                                         "task_id": uid()}, timeout=90)  # fmt: skip
    assert done["type"] == "completed", done
    grew = {k: v - before[k] for k, v in counts().items()}
    assert all(v > 0 for v in grew.values()), grew
    # Each finished step observed its queue once: plan, two workers, validate, summary.
    assert grew["queue"] >= 5, grew
