"""A 3-node nats-server cluster on loopback (JetStream, R3), for the chaos tier,
fenced as production is.

Each node is a ``baton.natsd.NatsServer`` in operator mode, its configuration
written by the same code as ``baton up``'s (``accounts.render_operator``:
the operator JWT, the ``full`` resolver, the accounts of ``tenants``) plus a
``cluster`` block: the nodes share one operator, one set of accounts and one
data directory of credentials (``secrets/nats.json`` and every identity's
``.creds``), and each keeps its own file store and resolver directory (account
pushes reach the others through the cluster). Nodes can be SIGKILLed,
restarted on the same ports and store, paused (SIGSTOP) and resumed; leaders
are found through the monitoring endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from baton import accounts
from baton.credentials import Credentials
from baton.natsd import NatsServer, NatsServerError, ServerAuth, ServerCluster, free_port
from baton.urls import with_creds


class Node:
    """One node: a ``NatsServer`` with a name and the chaos tier's verbs."""

    def __init__(self, name: str, server: NatsServer) -> None:
        self.name = name
        self.server = server

    @property
    def url(self) -> str:
        """Its address (no credentials)."""
        return self.server.address

    @property
    def store(self) -> Path:
        return self.server.store_dir

    @property
    def resolver_dir(self) -> Path:
        return self.server.resolver_dir

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def spawn(self) -> None:
        self.server.launch()

    def wait_ready(self, timeout: float = 20.0) -> None:
        self.server.wait_ready(timeout)

    @property
    def running(self) -> bool:
        return self.server.running

    def kill(self) -> None:
        self.server.kill()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.stop(timeout)

    def pause(self) -> None:
        assert self.server.proc is not None
        os.killpg(self.server.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.server.proc is not None
        os.killpg(self.server.proc.pid, signal.SIGCONT)

    def jsz(self) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.server.monitor_port}/jsz?accounts=true&streams=true"
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]


class Cluster:
    """``size`` nodes with Baton's accounts for ``tenants``; the secrets and
    ``.creds`` files live in ``data_dir`` (what ``baton tenant`` reads).
    ``tags``: each node's ``server_tags`` (``("region:eu",)``), in order."""

    def __init__(self, root: Path, tenants: list[str], size: int = 3, *, encrypt: bool = True,
                 tags: Sequence[tuple[str, ...]] = ()) -> None:  # fmt: skip
        self.data_dir = root / "data"
        self.creds = Credentials.load_or_create(self.data_dir, tenants)
        self._made = (root, list(tenants), size, encrypt, tags)
        self.nodes = self._nodes()

    def _nodes(self) -> list[Node]:
        """The nodes, on ports picked now."""
        root, tenants, size, encrypt, tags = self._made
        ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
        routes = tuple(f"nats://127.0.0.1:{c}" for _, c, _ in ports)
        return [
            Node(f"n{i + 1}", NatsServer(
                root / f"n{i + 1}", port=p, monitor_port=m, server_name=f"n{i + 1}",
                auth=ServerAuth(tenants, self.creds, encrypt=encrypt),
                cluster=ServerCluster("baton-chaos", c, routes),
                tags=tuple(tags[i]) if tags else ()))
            for i, (p, c, m) in enumerate(ports)
        ]  # fmt: skip

    @property
    def address(self) -> str:
        """Every node, comma-separated (``baton.bus.connect`` splits it)."""
        return ",".join(n.url for n in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node with the operator's ``.creds`` (every right in BATON)."""
        return self.url_for(accounts.OPERATOR)

    def url_for(self, identity: str) -> str:
        """Every node with ``identity``'s ``.creds`` (what a service is given)."""
        return with_creds(self.address, self.creds_for(identity))

    def creds_for(self, identity: str) -> Path:
        return self.creds.creds_path(identity)

    def start(self) -> Cluster:
        """Every node, with a meta leader. A port taken between its pick and
        the node's bind (another process on the box) is picked again, the
        whole cluster with it (the routes name every port), twice at most."""
        for attempt in range(3):
            try:
                for n in self.nodes:
                    n.spawn()
                for n in self.nodes:
                    n.wait_ready()
                self.wait_meta_leader()
                return self
            except NatsServerError as exc:
                self.stop()
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                self.nodes = self._nodes()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def meta_leader(self) -> str | None:
        for n in self.nodes:
            if not n.running:
                continue
            try:
                meta = n.jsz().get("meta_cluster") or {}
            except OSError:
                continue
            leader = meta.get("leader") if isinstance(meta, dict) else None
            if leader:
                return str(leader)
        return None

    def wait_meta_leader(self, timeout: float = 30.0) -> str:
        return self.wait_leader("meta", timeout)

    def wait_leader(self, group: str, timeout: float = 30.0) -> str:
        """The leader of ``group`` ("meta" or a stream name), waiting out an
        election: right after a fault the group may have none for a moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.meta_leader() if group == "meta" else self.stream_leader(group)
            if leader:
                return leader
            time.sleep(0.2)
        raise NatsServerError(f"no leader for {group} in {timeout}s")

    def stream_leader(self, stream: str) -> str | None:
        """The node leading ``stream``'s raft group (in BATON's account: its
        name on the server is its public key), from any node's /jsz."""
        baton = self.creds.keys().account(accounts.BATON_ACCOUNT)
        for n in self.nodes:
            if not n.running:
                continue
            try:
                info = n.jsz()
            except OSError:
                continue
            for acc in info.get("account_details") or []:  # type: ignore[union-attr]
                if acc.get("name") != baton and acc.get("id") != baton:
                    continue
                for s in acc.get("stream_detail") or []:
                    if s.get("name") == stream and (s.get("cluster") or {}).get("leader"):
                        return str(s["cluster"]["leader"])
        return None
