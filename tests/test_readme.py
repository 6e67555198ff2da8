"""The README's promises: its first two commands, and its example client,
which must run as printed (nats-py + msgpack only) against a live stack."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from baton.testing import LocalStack

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
    # As `make up` leaves it: the tenant's URL under the data dir, read from the cwd.
    url_file = tmp_path / ".data" / "tenants" / "acme.url"
    url_file.parent.mkdir(parents=True)
    url_file.write_text(stack.url_for("acme") + "\n")
    out = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "'type': 'completed'" in out.stdout and "'cost_usd'" in out.stdout
