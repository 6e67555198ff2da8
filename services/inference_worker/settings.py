"""Inference worker settings (env ``BATON_*``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr

from baton.settings import CommonSettings, default_worker_id


class WorkerSettings(CommonSettings):
    # Port of the worker's HTTP server (health, readiness, metrics).
    http_port: int = 8082
    # The model pool this worker serves (it pulls the jobs of worker-<pool>).
    pool: str = "default"
    # This worker's name in heartbeats, routing and metrics; unique per process.
    worker_id: str = default_worker_id()
    # vllm: vLLM in this process; openai: an OpenAI-compatible server; sim: the simulator.
    engine: Literal["vllm", "openai", "sim"] = "sim"

    # vllm: the model. Unset = the default real model (SmolLM2-135M-Instruct in
    # <data-dir>/models, built once by `baton model fetch` / `make model`);
    # "tiny" = a random-weight test model (built on start, no download); else
    # a local model directory. Nothing is downloaded at run time.
    model: str | None = None
    # The model's name in results and metrics; unset = after the model
    # (smollm2-135m-instruct, tiny, or the directory's name; the simulator's
    # is sim, the openai engine's BATON_OPENAI_MODEL).
    served_model_name: str | None = None

    # Engine shape (vllm): each is the AsyncEngineArgs field of the same name.
    # Unset = vLLM's own default, or the CPU profile's value when vLLM runs on
    # CPU (engines/vllm_args.py). The sim and openai engines declare
    # max_model_len and max_num_seqs (2048 and 64 when unset).
    max_model_len: int | None = None
    # Sequences the engine runs at once (see BATON_MAX_MODEL_LEN for unset).
    max_num_seqs: int | None = None
    # GPUs one engine spans by tensor parallelism (needs shared memory: /dev/shm).
    tensor_parallel_size: int | None = None
    # Pipeline stages one engine spans.
    pipeline_parallel_size: int | None = None
    # Fraction of each GPU's memory vLLM may use (weights, activations, KV cache).
    gpu_memory_utilization: float | None = None
    # Tokens the scheduler batches per step (chunked prefill).
    max_num_batched_tokens: int | None = None
    # Weight quantization method (awq, gptq, fp8, ...); unset = from the model.
    quantization: str | None = None
    # Weight and activation dtype; unset = auto on GPU, bfloat16 on CPU.
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] | None = None
    # Tokens per KV-cache block (a multiple of 32 on CPU; only full blocks are prefix-cached).
    block_size: int | None = None
    # Reuse the KV-cache blocks of a prompt prefix already computed.
    enable_prefix_caching: bool | None = None
    # True = no CUDA graphs (eager mode): faster start, slower decode.
    enforce_eager: bool | None = None
    # KV cache size in bytes, overriding gpu_memory_utilization's share.
    kv_cache_memory_bytes: int | None = None
    # Any other AsyncEngineArgs field, as JSON: '{"swap_space": 8}'. A key
    # vLLM does not know, or one also set by a named setting, stops the worker.
    vllm_args: dict[str, Any] = Field(default_factory=dict)
    # "auto": the CPU profile when vLLM runs on CPU; "none": never.
    vllm_profile: Literal["auto", "none"] = "auto"

    # Admission: fraction of the engine's KV-cache tokens the worker may promise.
    kv_headroom: float = 0.9
    # Jobs fetched from NATS in one pull, at most.
    max_fetch: int = 32
    # Jobs fetched beyond what fits, waiting for room on this worker: the
    # admission picks among them fairly by work (the tenant holding the fewest
    # admitted tokens first). 0: fetch only what fits.
    admission_queue: int = 4
    # "tokens": that fair order; "fifo": jobs are admitted as they arrived.
    admission_order: Literal["tokens", "fifo"] = "tokens"
    context_budget: int = 0  # window tokens; 0 = max_model_len - max_tokens
    # Token deltas on baton.tokens.<tenant>.<task_id>, batched this many
    # seconds apart (20-50 ms keeps messages few and the stream live); 0 = off.
    # Above 4 open streams the interval grows in proportion (a worker sends
    # at most ~4 / token_interval deltas a second), up to token_interval_max.
    token_interval: float = 0.03
    # The longest interval between a stream's deltas however many are open.
    token_interval_max: float = 0.25

    # Simulator: prompt tokens processed per second.
    sim_prefill_tps: float = 20_000.0
    # Simulator: tokens generated per second, per sequence.
    sim_decode_tps: float = 400.0
    # Simulator: KV-cache capacity in tokens.
    sim_kv_tokens: int = 65_536
    # Simulator: seconds its engine takes to load (a model's weights would).
    sim_load_seconds: float = 0.0
    # Simulator: answers end after about this many tokens (0: at max_tokens).
    sim_answer_tokens: int = Field(default=0, ge=0)
    # Simulator: answer lengths spread +- this fraction of sim_answer_tokens
    # (drawn from the prompt, so the same prompt answers the same).
    sim_answer_spread: float = Field(default=0.0, ge=0.0, le=1.0)

    # OpenAI-compatible server: its base URL.
    openai_base_url: str = "http://127.0.0.1:8000"
    # OpenAI-compatible server: the model name to request.
    openai_model: str = "tiny"
    # OpenAI-compatible server: the API key, if it wants one.
    openai_api_key: SecretStr | None = None

    # Seconds between heartbeats.
    heartbeat_interval: float = 2.0
    # A peer silent this long is dead: its own consumer's jobs are rescued.
    peer_stale_after: float = 10.0
    # Seconds in-flight jobs may take to finish after SIGTERM.
    drain_grace: float = 60.0
    # Seconds between an engine fault and the engine's restart.
    engine_restart_delay: float = 1.0
    # Seconds before a job that hit an out-of-memory error is tried again.
    oom_retry_delay: float = 2.0
    # Sessions remembered as warm in this worker's prefix cache (for routing).
    warm_sessions: int = 256

    @property
    def model_name(self) -> str:
        """The model's name in results, metrics and spans."""
        if self.served_model_name:
            return self.served_model_name
        if self.engine == "openai":
            return self.openai_model
        if self.engine == "sim" and not self.model:
            return "sim"
        from baton.models import served_name

        return served_name(self.model)

    def declared_shape(self) -> tuple[int, int]:
        """(max_model_len, max_num_seqs) for engines that declare them (sim, openai)."""
        return self.max_model_len or 2048, self.max_num_seqs or 64

    def vllm_named_args(self) -> dict[str, Any]:
        """The named engine settings, by AsyncEngineArgs field name (None = unset)."""
        from .engines.vllm_args import NAMED

        return {name: getattr(self, name) for name in NAMED}
