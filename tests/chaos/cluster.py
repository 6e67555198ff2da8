"""A 3-node nats-server cluster on loopback (JetStream, R3), for the chaos tier.

Each node is a real ``nats-server`` with its own client, cluster and
monitoring port and its own file store; every node lists all three routes.
Nodes can be SIGKILLed, restarted on the same ports and store, paused
(SIGSTOP) and resumed; leaders are found through the monitoring endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from baton.natsd import NatsServerError, find_binary, free_port

_READY = "Server is ready"


@dataclass
class Node:
    name: str
    store: Path
    port: int
    cluster_port: int
    monitor_port: int
    routes: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    _offset: int = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store / "nats-server.log"

    def spawn(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        args = [
            find_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
            "-js", "-sd", str(self.store / "jetstream"), "--server_name", self.name,
            "--cluster_name", "baton-chaos", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
            "--routes", ",".join(self.routes), "-l", str(self.log_path),
        ]  # fmt: skip
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise NatsServerError(f"{self.name} exited with {self.proc.returncode}")
            if self.log_path.exists():
                with self.log_path.open("rb") as f:
                    f.seek(self._offset)
                    if _READY in f.read().decode(errors="replace"):
                        return
            time.sleep(0.05)
        raise NatsServerError(f"{self.name} not ready in {timeout}s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def jsz(self) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.monitor_port}/jsz?streams=true"
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]


class Cluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
        routes = [f"nats://127.0.0.1:{c}" for _, c, _ in ports]
        self.nodes = [
            Node(f"n{i + 1}", root / f"n{i + 1}", p, c, m, routes)
            for i, (p, c, m) in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        """Every node, comma-separated (``baton.bus.connect`` splits it)."""
        return ",".join(n.url for n in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> Cluster:
        try:
            for n in self.nodes:
                n.spawn()
            for n in self.nodes:
                n.wait_ready()
            self.wait_meta_leader()
        except BaseException:
            self.stop()
            raise
        return self

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
        """The node leading ``stream``'s raft group, from any node's /jsz."""
        for n in self.nodes:
            if not n.running:
                continue
            try:
                info = n.jsz()
            except OSError:
                continue
            for acc in info.get("account_details") or []:  # type: ignore[union-attr]
                for s in acc.get("stream_detail") or []:
                    if s.get("name") == stream and (s.get("cluster") or {}).get("leader"):
                        return str(s["cluster"]["leader"])
        return None
