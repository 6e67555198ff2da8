"""Engine selection by configuration (``BATON_ENGINE=vllm|openai|sim``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Engine

if TYPE_CHECKING:
    from ..settings import WorkerSettings


def build_engine(settings: WorkerSettings) -> Engine:
    """The engine named by ``settings.engine`` (heavy imports stay lazy)."""
    if settings.engine == "sim":
        from .sim import SimEngine

        max_model_len, max_num_seqs = settings.declared_shape()
        return SimEngine(
            kv_tokens=settings.sim_kv_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            prefill_tps=settings.sim_prefill_tps,
            decode_tps=settings.sim_decode_tps,
            load_s=settings.sim_load_seconds,
            answer_tokens=settings.sim_answer_tokens,
            answer_spread=settings.sim_answer_spread,
        )
    if settings.engine == "openai":
        from .openai import OpenAIEngine

        key = settings.openai_api_key
        max_model_len, max_num_seqs = settings.declared_shape()
        return OpenAIEngine(
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            api_key=key.get_secret_value() if key else None,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
        )
    from .vllm import VLLMEngine

    model, _ = vllm_model(settings)
    return VLLMEngine(
        model=model,
        served_name=settings.model_name,
        named_args=settings.vllm_named_args(),
        extra_args=settings.vllm_args,
        profile=settings.vllm_profile,
    )


def vllm_model(settings: WorkerSettings) -> tuple[str, str]:
    """(model directory, served name) of ``BATON_MODEL`` (``baton.models``):
    the default real model, which must be built (``ModelMissing`` says how),
    ``tiny``, built here on first use (no download, a few seconds), or a
    directory."""
    from baton.models import model_choice, tiny_model_dir

    path, served = model_choice(settings.model, settings.data_dir)
    if path is None:
        from baton.dev.tinymodel import build_tiny_model

        path = build_tiny_model(tiny_model_dir(settings.data_dir))
    return str(path), served
