"""The no-download tiny model: deterministic, idempotent, loadable."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from baton.dev.tinymodel import MARKER, build_tiny_model

pytestmark = pytest.mark.vllm


def _digest(model_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.iterdir())
        if p.is_file()
    }


def test_build_is_deterministic_and_idempotent(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    assert (again / MARKER).is_file()
    assert _digest(again) == _digest(tiny_model_dir)

    t0 = time.perf_counter()
    assert build_tiny_model(again) == again
    assert time.perf_counter() - t0 < 0.5  # complete already: nothing rebuilt

    other = build_tiny_model(tmp_path / "seed1", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(again)["model.safetensors"]
    assert _digest(other)["tokenizer.json"] == _digest(again)["tokenizer.json"]


def test_incomplete_directory_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "partial"
    target.mkdir()
    (target / "config.json").write_text("{}")  # an interrupted earlier build
    (target / "notes.txt").write_text("keep me")
    build_tiny_model(target)
    assert (target / MARKER).is_file()
    assert (target / "notes.txt").read_text() == "keep me"
    assert '"LlamaForCausalLM"' in (target / "config.json").read_text()


def test_tokenizer_and_chat_template(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert len(tok) == config.vocab_size == 4096
    assert tok.eos_token_id == config.eos_token_id
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "def f(x): return x"},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\ndef f(x): return x<|end|>\n<|assistant|>\n"
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == prompt
    # Role markers and the end-of-turn marker are single tokens.
    assert ids.count(tok.convert_tokens_to_ids("<|end|>")) == 2
