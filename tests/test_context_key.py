"""The context store's signing key on a laptop (``<data-dir>/context.key``):
private from its first byte, and one key for replicas that start together."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.context_store.settings import ContextStoreSettings


def _settings(data_dir: Path) -> ContextStoreSettings:
    return ContextStoreSettings(data_dir=data_dir, context_key=None)


def test_the_key_file_is_created_private_not_made_private_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With every chmod a no-op, only a file created 0600 ends up 0600: one
    # written at the umask's mode and chmodded after was readable meanwhile.
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: None)
    old = os.umask(0o022)
    try:
        key = _settings(tmp_path).signing_key()
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "context.key").stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert len(key) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["context.key"]  # no temporary left


def test_replicas_starting_together_share_one_key(tmp_path: Path) -> None:
    for attempt in range(20):
        data = tmp_path / str(attempt)
        data.mkdir()
        with ThreadPoolExecutor(8) as pool:
            keys = set(pool.map(lambda d: _settings(d).signing_key(), [data] * 8))
        assert len(keys) == 1
        assert keys == {(data / "context.key").read_text().strip().encode()}
