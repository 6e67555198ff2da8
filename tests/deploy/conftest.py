"""Shared helpers for the deployment checks (fast, offline, real tools)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Import this checkout's `proto`, not whatever an editable install points at.
sys.path.insert(0, str(ROOT))


def require_tool(name: str) -> str:
    """The tool's path. Missing: a skip, or a failure under `make test` and CI
    (BATON_REQUIRE_TOOLS=1), which install it with `make system-deps`, so that
    they never pass by skipping the checks."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (`make system-deps`; docs/deploy.md, 'CI tools')"
        if os.environ.get("BATON_REQUIRE_TOOLS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


def run(cmd: list[str], *, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
