from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from baton.bus import Bus, connect
from baton.dev.testing import Client, LocalStack, secure_nats
from baton.natsd import NatsServer
from tests.harness import nats_source


@pytest.fixture(autouse=True)
def _structlog_as_found() -> Iterator[None]:
    """Each test leaves structlog as it found it. A test that runs the CLI
    in-process (its ``main`` filters out everything below ERROR) would
    otherwise silence the info logs later tests read (``capture_logs``)."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def nats_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, NatsServer | None]]:
    with nats_source(tmp_path_factory.mktemp("nats")) as env:
        yield env


@pytest.fixture(scope="session")
def nats_url(nats_env: tuple[str, NatsServer | None]) -> str:
    return nats_env[0]


@pytest.fixture(scope="session")
def stack(
    nats_env: tuple[str, NatsServer | None], nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """One context store, orchestrator, sim worker and tool worker for the whole session."""
    s = LocalStack(nats_env[1] or nats_url, tmp_path_factory.mktemp("stack")).start(tool_workers=1)
    yield s
    s.stop()


@pytest.fixture
async def bus(stack: LocalStack, request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """A Baton bus on the shared stack's NATS, named for the test module."""
    b = await connect(stack.nats_url, name=request.module.__name__.rpartition(".")[2])
    yield b
    await b.close()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    c = await Client.connect(nats_url)
    yield c
    await c.close()


@pytest.fixture
async def own_client(own_nats: NatsServer) -> AsyncIterator[Client]:
    """A plain nats-py + msgpack client of ``own_nats``."""
    c = await Client.connect(own_nats.url)
    yield c
    await c.close()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A private nats-server for tests that restart or break things."""
    server = secure_nats(tmp_path / "nats", encrypt=False).start()
    yield server
    server.stop()


@pytest.fixture
def own_stack(own_nats: NatsServer, tmp_path: Path) -> Iterator[LocalStack]:
    """A stack on ``own_nats``, nothing started yet (the test starts what it
    needs: ``LocalStack.start``), stopped after."""
    s = LocalStack(own_nats, tmp_path / "s")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A test module's own nats-server in operator mode with tenant ``acme``
    (the tenant-admin tests': tenants are made and deleted on it). Unencrypted:
    deletion is checked against the raw files."""
    s = secure_nats(tmp_path_factory.mktemp("tenancy") / "nats", ("acme",), encrypt=False)
    s.start()
    yield s
    s.stop()
