"""Ports for test servers: picked where an outgoing connection cannot take
them, and picked again when another process took one anyway."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from baton import natsd
from tests.chaos import cluster as chaos_cluster
from tests.chaos.cluster import Cluster


def test_a_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    low = natsd._ephemeral_low()
    for _ in range(20):
        port = natsd.free_port()
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_cluster_port_taken_before_its_bind_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        picks = iter([port])  # n1's client port: already someone else's
        monkeypatch.setattr(chaos_cluster, "free_port", lambda: next(picks, 0) or natsd.free_port())
        c = Cluster(tmp_path, tenants=["acme"], encrypt=False, size=3)
        assert c.nodes[0].server.port == port
        c.start()
        try:
            assert port not in {n.server.port for n in c.nodes}
            assert c.meta_leader() is not None
        finally:
            c.stop()
