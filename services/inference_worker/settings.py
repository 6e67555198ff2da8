"""Inference worker settings (env ``BATON_*``)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import SecretStr

from baton.settings import CommonSettings


def _default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40]}-{os.getpid()}"


class WorkerSettings(CommonSettings):
    http_port: int = 8082
    pool: str = "default"
    worker_id: str = _default_worker_id()
    engine: Literal["vllm", "openai", "sim"] = "sim"

    # Model and engine shape (vllm / sim; the openai engine declares them).
    model: str | None = None  # a model directory; unset = the tiny model
    served_model_name: str = "tiny"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    kv_cache_bytes: int = 128 * 2**20
    block_size: int = 128
    enforce_eager: bool = True

    # Admission: fraction of the engine's KV tokens the worker may promise.
    kv_headroom: float = 0.9
    max_fetch: int = 32
    context_budget: int = 0  # window tokens; 0 = max_model_len - max_tokens
    larger_pool: str | None = None  # jobs too long for this worker go there

    # Simulator shape.
    sim_prefill_tps: float = 20_000.0
    sim_decode_tps: float = 400.0  # per sequence
    sim_kv_tokens: int = 65_536

    # OpenAI-compatible server.
    openai_base_url: str = "http://127.0.0.1:8000"
    openai_model: str = "tiny"
    openai_api_key: SecretStr | None = None

    heartbeat_interval: float = 2.0
    # A peer silent this long is dead: its own consumer's jobs are rescued.
    peer_stale_after: float = 10.0
    drain_grace: float = 60.0
    engine_restart_delay: float = 1.0
    oom_retry_delay: float = 2.0
    warm_sessions: int = 256
