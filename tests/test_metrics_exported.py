"""Every metric the alert rules and the dashboard rely on (deploy/metrics.txt)
is exported by a running Baton service."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

from baton.testing import Client, LocalStack, uid

CATALOGUE = Path(__file__).parents[1] / "deploy" / "metrics.txt"
# Only exported where pynvml finds a GPU (tests/test_gpu_metrics.py, fake NVML).
GPU_ONLY = {"baton_worker_gpu_memory_used_bytes", "baton_worker_gpu_memory_free_bytes"}


def _exported(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    names = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines()
             if line and not line.startswith("#")}  # fmt: skip
    return names | {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


async def test_running_services_export_every_catalogued_metric(
    stack: LocalStack, client: Client
) -> None:
    done = await client.run("chat", {"tenant": "hooli", "input": "hi", "task_id": uid()})
    assert done["type"] == "completed"
    wanted = {ln.strip() for ln in CATALOGUE.read_text().splitlines() if ln.strip()}
    for _ in range(40):  # gauges fed by periodic loops (heartbeats, backlog) need a beat
        exported: set[str] = set()
        for proc in stack.procs:
            exported |= _exported(proc.url)
        if not wanted - GPU_ONLY - exported:
            break
        await asyncio.sleep(0.25)
    assert wanted - GPU_ONLY - exported == set()
