"""Shared helpers for the deployment checks (fast, offline, real tools)."""

from __future__ import annotations

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
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (see docs/deploy.md, 'CI tools')")
    return path


def run(cmd: list[str], *, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
