"""A service without API keys serves HTTP on loopback only: asked to bind any
other address it exits at once with one clear line, before touching NATS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from baton.natsd import free_port
from baton.service import bind_refusal
from baton.stack import MODULES


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_needs_no_keys(host: str) -> None:
    assert bind_refusal(host, {}) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "fe80::1", "nats"])
def test_any_other_host_needs_keys(host: str) -> None:
    refusal = bind_refusal(host, {})
    assert refusal is not None and host in refusal and "BATON_API_KEYS" in refusal
    assert bind_refusal(host, {"k-1": "*"}) is None


@pytest.mark.parametrize("service", sorted(MODULES))
@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_service_refuses_to_start_on_a_wildcard_without_keys(service: str, host: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATON_", "NATS_"))}
    env |= {
        "BATON_HTTP_HOST": host,
        "BATON_HTTP_PORT": str(free_port()),
        "BATON_ENGINE": "sim",
        # Nothing listens here: the refusal must come before any connection.
        "BATON_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "BATON_CONNECT_TIMEOUT": "30",
    }
    out = subprocess.run(
        [sys.executable, "-m", MODULES[service]],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [
        f"baton-{service}: refusing to serve HTTP on {host} without API keys: set BATON_API_KEYS"
        " (JSON, key -> tenant or '*') or bind BATON_HTTP_HOST=127.0.0.1"
    ]
    assert out.stdout == ""


def test_tenant_data_on_loopback_needs_keys_or_an_explicit_opt_out() -> None:
    refusal = bind_refusal("127.0.0.1", {}, tenant_data=True)
    assert refusal is not None and "BATON_ALLOW_NO_API_KEYS" in refusal
    assert bind_refusal("127.0.0.1", {}, tenant_data=True, allow_no_keys=True) is None
    assert bind_refusal("127.0.0.1", {"k-1": "acme"}, tenant_data=True) is None
    # The opt-out never opens a wildcard address.
    assert bind_refusal("0.0.0.0", {}, tenant_data=True, allow_no_keys=True) is not None


@pytest.mark.parametrize("service", ["orchestrator", "context-store"])
def test_a_service_with_tenant_data_refuses_to_start_without_keys(service: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATON_", "NATS_"))}
    env |= {"BATON_HTTP_PORT": str(free_port()), "BATON_NATS_URL": f"nats://127.0.0.1:{free_port()}",
            "BATON_CONNECT_TIMEOUT": "30"}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", MODULES[service]], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "refusing to serve tenants' data over HTTP without API keys" in out.stderr
    # Opted out: it starts (and fails later, on the NATS nobody runs) after a loud warning.
    env |= {"BATON_ALLOW_NO_API_KEYS": "true", "BATON_CONNECT_TIMEOUT": "0.5"}
    out = subprocess.run([sys.executable, "-m", MODULES[service]], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert "WARNING: HTTP API WITHOUT AUTHENTICATION" in out.stderr
    assert "refusing" not in out.stderr
