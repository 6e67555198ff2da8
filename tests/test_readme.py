"""The README's promises: its first two commands, and its example client,
which must run as printed (nats-py + msgpack only) against a live stack."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from baton.dev.testing import LocalStack, uid
from baton.urls import split_creds

README = Path(__file__).parents[1] / "README.md"


def test_the_first_two_commands_are_make_up_and_make_test() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(), re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert [c for c in commands if c][:2] == ["make up", "make test"]


def test_the_readme_example_runs_unchanged_against_a_stack(
    stack: LocalStack, tmp_path: Path
) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    source = code.group(1)
    assert "baton" not in source.split("asyncio.run")[0].split("import")[1].split("\n")[0]
    assert len([ln for ln in source.splitlines() if ln.strip()]) <= 16
    # As `make up` leaves it: the tenant's address and .creds under the data
    # dir, read from the cwd.
    address, creds = split_creds(stack.url_for("acme"))
    assert creds is not None, "the stack's NATS runs in operator mode"
    url_file = tmp_path / ".data" / "tenants" / "acme.url"
    url_file.parent.mkdir(parents=True)
    url_file.write_text(address + "\n")
    shutil.copy(creds, url_file.with_suffix(".creds"))
    out = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "'type': 'completed'" in out.stdout and "'cost_usd'" in out.stdout


def _block(lang: str, containing: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"one ```{lang} block with {containing!r}"
    return found[0]


def test_the_readme_http_and_openai_examples_run_unchanged_with_keys(
    stack: LocalStack, tmp_path: Path
) -> None:
    """As `make up` leaves it: API keys on, the tenant's key under the data
    dir. Only the port differs (a test never takes 8080)."""
    key = f"bk-{uid()}"
    orch = stack.service("orchestrator", BATON_API_KEYS=json.dumps({key: "acme"})).wait_ready()
    try:
        key_file = tmp_path / ".data" / "tenants" / "acme.key"
        key_file.parent.mkdir(parents=True)
        key_file.write_text(key + "\n")

        def here(source: str) -> str:
            assert "http://127.0.0.1:8080" in source
            return source.replace("http://127.0.0.1:8080", orch.url)

        curl = subprocess.run(["bash", "-c", here(_block("sh", "curl"))], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)  # fmt: skip
        assert curl.returncode == 0, curl.stderr
        assert "tasks" in json.loads(curl.stdout)
        openai = subprocess.run([sys.executable, "-c", here(_block("python", "from openai"))],
                                capture_output=True, text=True, timeout=90, cwd=tmp_path)  # fmt: skip
        assert openai.returncode == 0, openai.stderr
        answer, streamed = openai.stdout.split("\n", 1)
        assert answer.strip() and streamed.strip(), openai.stdout
        # Both answers were tasks of the key's tenant.
        listed = json.loads(subprocess.run(["bash", "-c", here(_block("sh", "curl"))],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path).stdout)  # fmt: skip
        assert len(listed["tasks"]) >= 2 and {t["tenant"] for t in listed["tasks"]} == {"acme"}
    finally:
        stack.retire(orch)


NODE_DIR = Path(__file__).parent / "node"  # package.json + lock: `make node-deps` (npm ci)


def test_the_readme_node_client_completes_a_chat_and_its_second_turn(
    stack: LocalStack, tmp_path: Path
) -> None:
    """The official Node.js client (nats@2) with the tenant's .creds file and
    nothing of Baton's."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "nats").exists():
        missing = "node" if node is None else f"{NODE_DIR}/node_modules (make node-deps)"
        if os.environ.get("BATON_REQUIRE_TOOLS"):
            pytest.fail(f"BATON_REQUIRE_TOOLS: {missing} is missing")
        pytest.skip(f"{missing} is missing")
    source = _block("js", "credsAuthenticator")
    address, creds = split_creds(stack.url_for("acme"))
    assert creds is not None
    data = tmp_path / ".data" / "tenants"
    data.mkdir(parents=True)
    (data / "acme.url").write_text(address + "\n")
    shutil.copy(creds, data / "acme.creds")
    out = subprocess.run([node, "-e", source], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ,
                                            "NODE_PATH": str(NODE_DIR / "node_modules")})  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("completed ") for ln in lines), out.stdout
    assert lines[0].split()[1] == lines[1].split()[1]  # the second turn, same session
