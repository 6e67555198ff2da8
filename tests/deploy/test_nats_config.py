"""The NATS accounts and permissions of compose and Kubernetes come from
``baton.accounts`` (through deploy/nats/gen_accounts.py), hold no secret, and
every password they reference reaches nats-server and exactly one service;
the real nats-server runs the rendered Kubernetes config: identities over
TLS, anonymous clients refused."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import socket
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from conftest import DEPLOY
from test_k8s import NAMESPACE, OVERLAYS, _env, _secret_ref, container, objects

from baton import accounts

SECRET = "baton-nats-passwords"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_accounts", DEPLOY / "nats" / "gen_accounts.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _generator()


def referenced(conf: str) -> set[str]:
    """The $VARIABLES a nats-server config reads from its environment."""
    code = "\n".join(ln.split("#", 1)[0] for ln in conf.splitlines())
    return set(re.findall(r"(?<![\"\w])\$([A-Z][A-Z0-9_]*)", code))


def test_committed_configs_are_the_generators_output():
    text = gen.render(gen.tenants())
    for path in gen.OUTPUTS:
        assert path.read_text() == text, f"{path} is stale: run python deploy/nats/gen_accounts.py"
    assert gen.main(["--check"]) == 0


def test_the_generator_sees_a_change():
    """Not vacuous: another tenant list renders another file."""
    tenants = gen.tenants()
    assert gen.render([*tenants, "globex"]) != gen.render(tenants)
    assert '"globex"' in gen.render([*tenants, "globex"])


def test_no_secret_in_the_configs():
    from baton import accounts

    text = gen.OUTPUTS[0].read_text()
    passwords = re.findall(r'"password":\s*(\S+)', text)
    identities = accounts.identities(gen.tenants())
    assert len(passwords) == len(identities)
    assert all(p.startswith("$NATS_PASSWORD_") for p in passwords), passwords
    assert referenced(text) == {accounts.password_var(i) for i in identities}


def _service_urls(envs: dict[str, dict[str, str]]) -> None:
    """Each service connects as its own identity with its own password."""
    from baton import accounts

    # The services these files deploy (the tool worker is not deployed by them).
    assert {"orchestrator", "context-store", "inference-worker"} <= set(envs)
    assert set(envs) <= set(accounts.SERVICES)
    for name, env in envs.items():
        url = urllib.parse.urlsplit(env["BATON_NATS_URL"])
        assert url.username == name, url
        assert env["password_var"] == accounts.password_var(name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_wires_each_password_to_nats_and_to_its_service_only(overlay):
    from baton import accounts

    sts = objects(overlay, "StatefulSet")["nats"]
    (cm,) = [d for n, d in objects(overlay, "ConfigMap").items() if n.startswith("nats-config")]
    (nats,) = sts["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": SECRET}} in nats["envFrom"]
    assert SECRET not in objects(overlay, "Secret"), "passwords must not be rendered from git"
    needed = set().union(*(referenced(t) for t in cm["data"].values()))
    plain = set(_env(nats))  # POD_NAME, CLIENT_ADVERTISE, JETSTREAM_KEY
    assert {v for v in needed if v.startswith("NATS_PASSWORD_")} == {
        accounts.password_var(i) for i in accounts.identities(gen.tenants())
    }
    assert needed - plain == {v for v in needed if v.startswith("NATS_PASSWORD_")}
    (config,) = [
        d for n, d in objects(overlay, "ConfigMap").items() if n.startswith("baton-config")
    ]
    assert config["data"]["BATON_TENANTS"] == ",".join(gen.tenants())  # the orchestrator's
    envs = {}
    for name, d in objects(overlay, "Deployment").items():
        env = _env(container(d))
        secret, key = _secret_ref(env["NATS_PASSWORD"])
        assert secret == SECRET
        assert "$(NATS_PASSWORD)" in env["BATON_NATS_URL"]["value"]
        # NATS_PASSWORD must come before the URL that expands it.
        names = [e["name"] for e in container(d)["env"]]
        assert names.index("NATS_PASSWORD") < names.index("BATON_NATS_URL")
        assert not any("secretRef" in s and s["secretRef"]["name"] == SECRET
                       for s in container(d).get("envFrom", []))  # fmt: skip
        envs[name] = {"BATON_NATS_URL": env["BATON_NATS_URL"]["value"], "password_var": key}
    _service_urls(envs)


def test_compose_wires_each_password_to_nats_and_to_its_service_only():
    def services(name: str) -> dict:
        return yaml.safe_load((DEPLOY / "compose" / name).read_text())["services"]

    base = services("compose.yaml")
    nats = base["nats"]
    assert "/etc/nats/nats.conf" in nats["command"]
    conf = DEPLOY / "compose" / "nats" / "nats.conf"
    assert "include ./accounts.conf" in conf.read_text()
    assert referenced(gen.OUTPUTS[0].read_text()) == set(nats["environment"])
    for var, value in nats["environment"].items():
        assert value.startswith(f"${{{var}:?"), (var, value)  # from the environment, required
    urls = {name: base[name]["environment"]["BATON_NATS_URL"]
            for name in ("orchestrator", "context-store")}  # fmt: skip
    for override in ("compose.cpu.yaml", "compose.gpu.yaml"):
        worker = services(override)["inference-worker"]["environment"]["BATON_NATS_URL"]
        urls.setdefault("inference-worker", worker)
        assert worker == urls["inference-worker"], override
    envs = {}
    for name, url in urls.items():
        (var,) = re.findall(r"\$\{(\w+)(?::\?[^}]*)?\}", url)
        envs[name] = {"BATON_NATS_URL": re.sub(r"\$\{[^}]*\}", "pw", url), "password_var": var}
    _service_urls(envs)
    assert base["orchestrator"]["environment"]["BATON_TENANTS"] == ",".join(gen.tenants())


# -- the real nats-server on the rendered Kubernetes config -----------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def materialise(overlay: str, tmp: Path) -> tuple[Path, dict[str, str], Path]:
    """Write the overlay's nats-config files with the pod's paths moved under
    ``tmp`` and certificates from a throwaway CA standing in for
    cert-manager's. Returns (nats.conf, the pod's environment, CA file)."""
    trustme = pytest.importorskip("trustme")
    from baton import accounts

    ca = trustme.CA()
    leaf = ca.issue_cert(f"*.nats-headless.{NAMESPACE}.svc.cluster.local", "nats", "127.0.0.1")
    for secret in ("server", "routes"):
        d = tmp / "nats-tls" / secret
        d.mkdir(parents=True)
        leaf.cert_chain_pems[0].write_to_path(str(d / "tls.crt"))
        leaf.private_key_pem.write_to_path(str(d / "tls.key"))
        ca.cert_pem.write_to_path(str(d / "ca.crt"))
    (cm,) = [d for n, d in objects(overlay, "ConfigMap").items() if n.startswith("nats-config")]
    etc = tmp / "etc-nats"
    etc.mkdir()
    moves = {
        "/etc/nats-tls/": f"{tmp}/nats-tls/",
        "store_dir: /data": f"store_dir: {tmp}/data",
        "/var/run/nats/": f"{tmp}/",
        "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{_free_port()}",
        "http: 0.0.0.0:8222": f"http: 127.0.0.1:{_free_port()}",
        "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{_free_port()}",
    }
    for fname, text in cm["data"].items():
        for old, new in moves.items():
            text = text.replace(old, new)
        (etc / fname).write_text(text)
    env = {"PATH": "/usr/bin:/bin", "POD_NAME": "nats-0", "CLIENT_ADVERTISE": "127.0.0.1:4222",
           "JETSTREAM_KEY": "k" * 32}  # fmt: skip
    for identity in accounts.identities(gen.tenants()):
        env[accounts.password_var(identity)] = f"pw-{identity}"
    ca_path = tmp / "nats-tls" / "server" / "ca.crt"
    return etc / "nats.conf", env, ca_path


def nats_server(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    from baton.natsd import find_binary

    return subprocess.run(
        [find_binary(), *args], capture_output=True, text=True, timeout=30, env=env
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_server_accepts_the_rendered_config_and_insists_on_its_secrets(overlay, tmp_path):
    conf, env, _ = materialise(overlay, tmp_path)
    ok = nats_server("-t", "-c", str(conf), env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for var in ("JETSTREAM_KEY", accounts.password_var("orchestrator")):
        missing = nats_server("-t", "-c", str(conf), env={k: v for k, v in env.items() if k != var})
        assert missing.returncode != 0 and var in missing.stdout + missing.stderr


async def test_the_rendered_single_config_serves_identities_over_tls_only(tmp_path):
    import nats
    import nats.errors

    conf, env, ca = materialise("single", tmp_path)
    port = int(re.search(r"listen: 127\.0\.0\.1:(\d+)", conf.read_text()).group(1))
    from baton.natsd import find_binary

    log = tmp_path / "nats.log"
    proc = subprocess.Popen([find_binary(), "-c", str(conf), "-l", str(log)], env=env,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while "Server is ready" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        tls = ssl.create_default_context(cafile=str(ca))
        pw = env[accounts.password_var("orchestrator")]
        nc = await nats.connect(f"nats://orchestrator:{pw}@127.0.0.1:{port}", tls=tls,
                                inbox_prefix=b"_INBOX_orchestrator", allow_reconnect=False)  # fmt: skip
        assert nc.is_connected
        await nc.close()
        # A tenant's identity works, inside its permissions only.
        violations: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            violations.append(exc)

        tenant = gen.tenants()[0]
        pw = env[accounts.password_var(tenant)]
        nc = await nats.connect(f"nats://{tenant}:{pw}@127.0.0.1:{port}", tls=tls,
                                error_cb=on_error, allow_reconnect=False)  # fmt: skip
        await nc.subscribe("baton.jobs.>")
        await nc.flush()
        await asyncio.sleep(0.2)
        await nc.close()
        assert any("permissions violation" in str(e).lower() for e in violations), violations
        for url, ctx in [
            (f"nats://127.0.0.1:{port}", tls),  # anonymous
            (f"nats://orchestrator:wrong@127.0.0.1:{port}", tls),  # bad password
        ]:
            with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
                await asyncio.wait_for(nats.connect(url, tls=ctx, allow_reconnect=False), 5)
    finally:
        proc.terminate()
        proc.wait(10)
