"""TLS to NATS with a certificate authority made in the test (trustme): the
services and a plain nats-py client connect over TLS and a task completes;
a client that does not trust the CA, or holds no client certificate when the
server asks for one, is refused; a client set up for TLS refuses a server
without it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest

from baton.bus import BusUnavailable, connect, tls_context
from baton.dev.testing import Client, LocalStack, http_json, secure_nats, uid
from baton.natsd import NatsServer, ServerTls, free_port
from baton.urls import split_creds

trustme = pytest.importorskip("trustme")


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("baton-services")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


@pytest.fixture(scope="module")
def mtls_nats(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A server that requires TLS and a client certificate signed by the CA."""
    tls = ServerTls(pki.server_cert, pki.server_key, verify_clients_with=pki.ca)
    server = secure_nats(
        tmp_path_factory.mktemp("mtls") / "nats", monitor_port=free_port(), tls=tls
    ).start()
    yield server
    server.stop()


async def _refusal(url: str, ctx: ssl.SSLContext | None) -> list[BaseException]:
    """Connect once without retrying, which must fail: what nats-py reported."""
    errors: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    kwargs: dict[str, Any] = {} if ctx is None else {"tls": ctx}
    url, kwargs["user_credentials"] = split_creds(url)
    try:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2, error_cb=on_error,
                                max_reconnect_attempts=0, **kwargs)  # fmt: skip
    except Exception as exc:
        errors.append(exc)
    else:
        await nc.close()
        raise AssertionError(f"connected to {url}")
    return errors


@pytest.fixture(scope="module")
async def tls_stack(
    mtls_nats: NatsServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalStack]:
    env = {
        "BATON_NATS_TLS_CA": str(pki.ca),
        "BATON_NATS_TLS_CERT": str(pki.client_cert),
        "BATON_NATS_TLS_KEY": str(pki.client_key),
    }
    stack = LocalStack(mtls_nats, tmp_path_factory.mktemp("tls-stack"), env=env).start()
    yield stack
    stack.stop()


async def test_services_and_a_plain_client_complete_a_task_over_mutual_tls(
    tls_stack: LocalStack, mtls_nats: NatsServer, pki: Pki
) -> None:
    ctx = tls_context(pki.ca, pki.client_cert, pki.client_key)
    client = await Client.connect(mtls_nats.url, tls=ctx)
    try:
        done = await client.run("chat", {"tenant": "acme", "input": "hi", "task_id": uid()})
        assert done["type"] == "completed", done
    finally:
        await client.close()
    # Each service's connection is a TLS one, as the server reports it.
    conns = http_json(f"http://127.0.0.1:{mtls_nats.monitor_port}/connz")["connections"]
    by_name = {c.get("name"): c for c in conns}
    assert {"orchestrator", "context-store", "inference-worker"} <= set(by_name), by_name.keys()
    assert all(c.get("tls_version", "").startswith("1.") for c in conns), conns


async def test_a_client_that_does_not_trust_the_ca_is_refused(mtls_nats: NatsServer, pki: Pki):
    ctx = ssl.create_default_context()  # the system's CAs only
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    errors = await _refusal(mtls_nats.url, ctx)
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in errors), errors


async def test_a_client_without_a_certificate_is_refused_by_the_server(
    mtls_nats: NatsServer, pki: Pki
):
    offset = mtls_nats.log_path.stat().st_size
    errors = await _refusal(mtls_nats.url, tls_context(pki.ca))
    assert errors, "the server accepted a client without a certificate"
    said = ""
    for _ in range(50):  # the server may log the refusal after the client saw it
        with mtls_nats.log_path.open() as f:
            f.seek(offset)
            said = f.read()
        if "TLS handshake error" in said:
            break
        await asyncio.sleep(0.1)
    assert "TLS handshake error" in said and "certificate" in said, said


async def test_a_client_without_tls_is_refused(mtls_nats: NatsServer):
    errors = await _refusal(mtls_nats.url, None)
    assert errors


async def test_the_service_transport_refuses_a_server_without_tls(pki: Pki, tmp_path: Path):
    plain = NatsServer(tmp_path / "nats").start()
    try:
        with pytest.raises(BusUnavailable, match="the server does not offer it"):
            await connect(plain.url, name="t", timeout=3, tls=tls_context(pki.ca))
    finally:
        plain.stop()


async def test_server_only_tls_accepts_a_client_that_trusts_the_ca(pki: Pki, tmp_path: Path):
    """The k8s overlays' shape: clients verify the server, present no certificate."""
    server = NatsServer(tmp_path / "nats", tls=ServerTls(pki.server_cert, pki.server_key)).start()
    try:
        bus = await connect(server.url, name="t", timeout=5, tls=tls_context(pki.ca))
        await bus.close()
        errors = await _refusal(server.url, ssl.create_default_context())
        assert any(isinstance(e, ssl.SSLCertVerificationError) for e in errors), errors
    finally:
        server.stop()


async def test_an_open_server_with_mutual_tls_wants_a_client_certificate(pki: Pki, tmp_path: Path):
    """Without accounts the ``tls {}`` block is ServerTls.config(): verify included."""
    tls = ServerTls(pki.server_cert, pki.server_key, verify_clients_with=pki.ca)
    server = NatsServer(tmp_path / "nats", tls=tls).start()
    try:
        ctx = tls_context(pki.ca, pki.client_cert, pki.client_key)
        bus = await connect(server.url, name="t", timeout=5, tls=ctx)
        await bus.close()
        assert await _refusal(server.url, tls_context(pki.ca)), "accepted without a certificate"
    finally:
        server.stop()


def test_a_client_certificate_without_its_key_is_a_settings_error(pki: Pki):
    from pydantic import ValidationError

    from baton.settings import CommonSettings

    with pytest.raises(ValidationError, match="BATON_NATS_TLS_KEY"):
        CommonSettings(nats_tls_cert=pki.client_cert)
    ok = CommonSettings(
        nats_tls_ca=pki.ca, nats_tls_cert=pki.client_cert, nats_tls_key=pki.client_key
    )
    assert tls_context(ok.nats_tls_ca, ok.nats_tls_cert, ok.nats_tls_key) is not None
    assert tls_context(None) is None
