"""Compose and Kubernetes run NATS in operator mode the way ``baton up`` does:
``baton nats-auth`` writes the server's ``auth.conf`` (operator, accounts as
JWTs, the full resolver) and every identity's ``.creds`` from
``baton.accounts``; the manifests hold no key, mount each service's own
``.creds`` only, and no password is left anywhere. The real nats-server runs
the rendered Kubernetes config with a generated ``auth.conf``: identities
over TLS, passwords and anonymous clients refused."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import stat
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from conftest import DEPLOY
from test_k8s import NAMESPACE, OVERLAYS, _env, _mount_of, container, objects

from baton import accounts
from baton.cli import main as baton_cli
from baton.credentials import ADMIN_BUNDLE, SECRETS_FILE, creds_path, write_deployment

CREDS_SECRET = "baton-nats-creds"
AUTH_SECRET = "baton-nats-auth"
ADMIN_SECRET = "baton-tenant-admin"
COMPOSE_CREDS = "/run/secrets/nats.creds"


def tenants() -> list[str]:
    """The deployments' tenants: deploy/nats/tenants."""
    lines = (DEPLOY / "nats" / "tenants").read_text().splitlines()
    return [t for ln in lines if (t := ln.split("#", 1)[0].strip())]


def _no_password(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    assert parts.username is None and parts.password is None, url
    assert (parts.hostname, parts.port) == ("nats", 4222), url


def test_nats_auth_writes_the_server_config_and_every_creds_file(tmp_path, capsys):
    args = ["nats-auth", str(tmp_path), "--tenants", ",".join(tenants()),
            "--resolver-dir", "/data/jwt", "--port", "14222"]  # fmt: skip
    assert baton_cli(args) == 0
    printed = capsys.readouterr().out
    for identity in accounts.identities(tenants()):
        path = creds_path(tmp_path, identity)
        assert "BEGIN NATS USER JWT" in path.read_text() and str(path) in printed
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert (tmp_path / "tenants" / f"{tenants()[0]}.url").read_text() == "nats://127.0.0.1:14222\n"
    conf = (tmp_path / "nats" / "auth.conf").read_text()
    assert '"dir": "/data/jwt"' in conf and '"type": "full"' in conf
    assert "password" not in conf and "SU" not in re.sub(r'"[^"]*"', "", conf)  # no seed
    keys = json.loads((tmp_path / SECRETS_FILE).read_text())["nkeys"]
    assert all(seed not in conf for seed in keys.values())
    # Run again (each `make compose-up`): the keys are kept, so are the accounts.
    assert baton_cli(args) == 0
    assert json.loads((tmp_path / SECRETS_FILE).read_text())["nkeys"] == keys
    publics = set(re.findall(r'"(A[A-Z2-7]{55})":', conf))
    assert len(publics) == 2 + len(tenants())
    assert set(re.findall(r'"(A[A-Z2-7]{55})":', (tmp_path / "nats" / "auth.conf").read_text())) \
        == publics  # fmt: skip
    assert baton_cli(["nats-auth", str(tmp_path), "--tenants", "SYS"]) == 2  # reserved


def _services(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "compose" / name).read_text())["services"]


def test_compose_runs_nats_in_operator_mode_and_each_service_reads_its_own_creds():
    doc = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    base = doc["services"]
    nats = base["nats"]
    assert nats["command"][:2] == ["-c", "/etc/nats/auth.conf"]
    (mount,) = [v for v in nats["volumes"] if v.endswith(":/etc/nats/auth.conf:ro")]
    assert mount.startswith("${BATON_COMPOSE_DATA:?") and "}/nats/auth.conf:" in mount
    assert "environment" not in nats  # no password to hand it
    services = {"context-store": base["context-store"]}
    for override in ("compose.cpu.yaml", "compose.gpu.yaml"):
        services[f"inference-worker ({override})"] = _services(override)["inference-worker"]
    for label, svc in services.items():
        name = label.split(" ")[0]
        env = svc["environment"]
        _no_password(env["BATON_NATS_URL"])
        assert env["BATON_NATS_CREDS"] == COMPOSE_CREDS, label
        (secret,) = svc["secrets"]
        assert secret == {"source": f"{name}-creds", "target": "nats.creds"}, label
        source = doc["secrets"][secret["source"]]["file"]
        # The file `baton nats-auth` writes for exactly this identity.
        rel = creds_path(Path("/d"), name).relative_to("/d")
        assert source.endswith(f"}}/{rel}"), (label, source)
        assert svc["group_add"] == ["${BATON_COMPOSE_GID:?see compose.yaml}"] or \
            svc["group_add"][0].startswith("${BATON_COMPOSE_GID:?")  # fmt: skip
    # The orchestrator reads its .creds from its tenant-admin bundle, which
    # `baton nats-auth` writes and no other service mounts.
    orch = base["orchestrator"]
    env = orch["environment"]
    _no_password(env["BATON_NATS_URL"])
    (mount,) = orch["volumes"]
    source, target = mount.rsplit(":", 1)
    assert source.startswith("${BATON_COMPOSE_DATA:?") and source.endswith(f"}}/{ADMIN_BUNDLE}")
    assert env["BATON_TENANT_ADMIN_DIR"] == target
    rel = creds_path(Path("/d"), "orchestrator").relative_to("/d")
    assert env["BATON_NATS_CREDS"] == f"{target}/{rel}"
    assert "secrets" not in orch
    assert "orchestrator-creds" not in doc["secrets"]
    compose_files = ("compose.yaml", "compose.cpu.yaml", "compose.gpu.yaml")
    for name in compose_files:
        others = yaml.safe_load((DEPLOY / "compose" / name).read_text())["services"]
        for svc_name, svc in others.items():
            if svc_name != "orchestrator":
                assert "tenant-admin" not in json.dumps(svc), (name, svc_name)
    for name in compose_files:
        assert "NATS_PASSWORD" not in (DEPLOY / "compose" / name).read_text(), name
    assert base["orchestrator"]["environment"]["BATON_TENANTS"] == ",".join(tenants())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_mounts_auth_conf_in_nats_and_each_services_own_creds(overlay):
    sts = objects(overlay, "StatefulSet")["nats"]
    (cm,) = [d for n, d in objects(overlay, "ConfigMap").items() if n.startswith("nats-config")]
    assert "include ./auth.conf" in cm["data"]["nats.conf"]
    assert "accounts.conf" not in cm["data"]
    assert not {AUTH_SECRET, CREDS_SECRET} & set(objects(overlay, "Secret")), "keys from git"
    pod = sts["spec"]["template"]
    (nats,) = pod["spec"]["containers"]
    assert "envFrom" not in nats
    volume, _ = _mount_of(pod, "/etc/nats/auth.conf")
    (secret,) = [s["secret"] for s in volume["projected"]["sources"] if "secret" in s]
    assert secret == {"name": AUTH_SECRET, "items": [{"key": "auth.conf", "path": "auth.conf"}]}
    (config,) = [
        d for n, d in objects(overlay, "ConfigMap").items() if n.startswith("baton-config")
    ]
    assert config["data"]["BATON_TENANTS"] == ",".join(tenants())  # the orchestrator's
    seen = set()
    for name, d in objects(overlay, "Deployment").items():
        c = container(d)
        env = _env(c)
        assert "NATS_PASSWORD" not in env, name
        _no_password(env["BATON_NATS_URL"]["value"])
        path = env["BATON_NATS_CREDS"]["value"]
        if name == accounts.ORCHESTRATOR:  # its .creds is in its tenant-admin bundle
            seen.add(name)
            continue
        volume, mount = _mount_of(d["spec"]["template"], path)
        assert mount.get("readOnly") is True
        assert volume["secret"]["secretName"] == CREDS_SECRET
        # Its own key only, readable through the pod's group.
        assert volume["secret"]["items"] == [{"key": f"{name}.creds",
                                              "path": path.rsplit("/", 1)[1]}]  # fmt: skip
        assert volume["secret"]["defaultMode"] == 0o440
        assert d["spec"]["template"]["spec"]["securityContext"]["fsGroup"]
        seen.add(name)
    assert seen == set(accounts.SERVICES)


def _workloads(overlay: str) -> dict[str, dict]:
    """Every object of the overlay that runs pods, by kind/name."""
    kinds = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
    return {f"{kind}/{name}": d for kind in kinds for name, d in objects(overlay, kind).items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_mounts_the_tenant_admin_bundle_into_the_orchestrator_only(overlay):
    assert ADMIN_SECRET not in objects(overlay, "Secret"), "keys from git"
    users = {n for n, d in _workloads(overlay).items() if ADMIN_SECRET in json.dumps(d)}
    assert users == {"Deployment/orchestrator"}, users
    pod = objects(overlay, "Deployment")[accounts.ORCHESTRATOR]["spec"]["template"]
    (init,) = pod["spec"]["initContainers"]
    (secret_volume,) = [v for v in pod["spec"]["volumes"] if "secret" in v
                        and v["secret"]["secretName"] == ADMIN_SECRET]  # fmt: skip
    secret = secret_volume["secret"]
    # The files `baton nats-auth` writes into DIR/tenant-admin, at the same paths.
    assert {i["path"] for i in secret["items"]} == {
        SECRETS_FILE.as_posix(),
        creds_path(Path("/d"), accounts.SYSTEM_USER).relative_to("/d").as_posix(),
        creds_path(Path("/d"), accounts.ORCHESTRATOR).relative_to("/d").as_posix(),
    }
    assert all(i["key"] == i["path"].rsplit("/", 1)[1] for i in secret["items"])
    assert secret["defaultMode"] == 0o440
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert init_mounts[secret_volume["name"]].get("readOnly") is True
    (c,) = pod["spec"]["containers"]
    env = _env(c)
    work = env["BATON_TENANT_ADMIN_DIR"]["value"]
    volume, mount = _mount_of(pod, f"{work}/x")
    assert mount["mountPath"] == work and volume == {"name": mount["name"], "emptyDir": {}}
    assert init_mounts[mount["name"]]["mountPath"] == work  # the copy lands there
    # The copy runs: the Secret's tree (with the kubelet's ..data links) to the volume.
    script = init["command"][-1]
    assert "/etc/baton-tenant-admin" in script and work in script
    rel = creds_path(Path("/d"), accounts.ORCHESTRATOR).relative_to("/d")
    assert env["BATON_NATS_CREDS"]["value"] == f"{work}/{rel}"
    assert all(m["name"] != secret_volume["name"] for m in c["volumeMounts"])


def test_the_bundle_files_are_what_the_kubernetes_secret_takes(tmp_path):
    """`kubectl create secret generic baton-tenant-admin --from-file=...`
    (docs/deploy.md) takes exactly the files nats-auth writes to DIR/tenant-admin."""
    write_deployment(tmp_path, tenants(), resolver_dir="/data/jwt")
    bundle = tmp_path / ADMIN_BUNDLE
    written = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert written == {"secrets/nats.json", "secrets/creds/system.creds",
                       "secrets/creds/orchestrator.creds"}  # fmt: skip
    docs = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    for rel in written:
        assert f"$DIR/{ADMIN_BUNDLE}/{rel}" in docs, rel


def test_nats_auth_takes_back_what_the_bundle_changed_at_run_time(tmp_path):
    """A tenant created through /v1/tenants (its keys in the bundle only) and
    one deleted through it: the next `baton nats-auth` (each `make
    compose-up`) keeps the first in auth.conf and drops the second."""
    from baton import jwt

    ids = tenants()
    write_deployment(tmp_path, ids, resolver_dir="/data/jwt")
    path = tmp_path / ADMIN_BUNDLE / SECRETS_FILE
    doc = json.loads(path.read_text())
    assert doc["bundle"] is True and "operator" not in doc["nkeys"]
    account = jwt.new_seed(jwt.ACCOUNT)
    doc["nkeys"] |= {"account:runtime": account, "user:runtime": jwt.new_seed(jwt.USER)}
    doc["api_keys"]["runtime"] = "bk-runtime"
    doc["deleted"] = [ids[-1]]
    path.write_text(json.dumps(doc))
    write_deployment(tmp_path, ids, resolver_dir="/data/jwt")
    conf = (tmp_path / "nats" / "auth.conf").read_text()
    assert f'"{jwt.Key(account).public}":' in conf
    assert (tmp_path / "tenants" / "runtime.creds").exists()
    full = json.loads((tmp_path / SECRETS_FILE).read_text())
    assert full["nkeys"]["account:runtime"] == account and ids[-1] in full["deleted"]
    assert f"account:{ids[-1]}" not in full["nkeys"]
    again = json.loads(path.read_text())
    assert again["nkeys"]["account:runtime"] == account  # the bundle keeps it too
    assert f"account:{ids[-1]}" not in again["nkeys"]


def test_regions_declared_ahead_need_no_new_creds_when_a_tenant_is_made_in_one(tmp_path):
    """`baton nats-auth --regions eu` (BATON_REGIONS): the context store's
    .creds names the eu streams from the start, the bundle knows the region
    (a tenant created in it through /v1/tenants re-issues nothing); a region
    first given through the bundle is taken back by the next nats-auth."""
    from baton import jwt
    from baton.tenants import TenantAdmin
    from proto import streams

    args = ["nats-auth", str(tmp_path), "--tenants", ",".join(tenants()), "--regions", "eu"]
    assert baton_cli(args) == 0
    store = creds_path(tmp_path, accounts.CONTEXT_STORE)
    perms = json.dumps(jwt.decode(jwt.creds_jwt(store.read_text()))["nats"])
    assert streams.context_home("eu").log.name in perms, perms
    assert streams.context_home("us").log.name not in perms
    admin = TenantAdmin(tmp_path / ADMIN_BUNDLE, "nats://127.0.0.1:1")
    assert admin.creds.regions == ["eu"]
    before = (tmp_path / ADMIN_BUNDLE / SECRETS_FILE).read_text()
    admin._add_region("eu")  # (what create --region eu does): nothing to record or re-issue
    assert (tmp_path / ADMIN_BUNDLE / SECRETS_FILE).read_text() == before
    admin._add_region("us")  # a region not declared: recorded in the bundle ...
    assert baton_cli(["nats-auth", str(tmp_path), "--tenants", ",".join(tenants())]) == 0
    perms = json.dumps(jwt.decode(jwt.creds_jwt(store.read_text()))["nats"])
    for region in ("eu", "us"):  # ... and the next nats-auth renders it
        assert streams.context_home(region).log.name in perms, region
    assert baton_cli([*args[:4], "--regions", "e u"]) == 2  # not a valid id


# -- the real nats-server on the rendered Kubernetes config -----------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def materialise(overlay: str, tmp: Path) -> tuple[Path, dict[str, str], Path, Path]:
    """Write the overlay's nats-config files and a generated auth.conf with
    the pod's paths moved under ``tmp`` and certificates from a throwaway CA
    standing in for cert-manager's. Returns (nats.conf, the pod's
    environment, CA file, the directory `baton nats-auth` wrote)."""
    trustme = pytest.importorskip("trustme")

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
    # The Secret baton-nats-auth holds what `baton nats-auth` wrote.
    out = tmp / "auth"
    write_deployment(out, tenants(), resolver_dir=str(tmp / "data" / "jwt"))
    (etc / "auth.conf").write_text((out / "nats" / "auth.conf").read_text())
    env = {"PATH": "/usr/bin:/bin", "POD_NAME": "nats-0", "CLIENT_ADVERTISE": "127.0.0.1:4222",
           "JETSTREAM_KEY": "k" * 32}  # fmt: skip
    ca_path = tmp / "nats-tls" / "server" / "ca.crt"
    return etc / "nats.conf", env, ca_path, out


def nats_server(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    from baton.natsd import find_binary

    return subprocess.run(
        [find_binary(), *args], capture_output=True, text=True, timeout=30, env=env
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_server_accepts_the_rendered_config_and_insists_on_its_parts(overlay, tmp_path):
    conf, env, _, _ = materialise(overlay, tmp_path)
    ok = nats_server("-t", "-c", str(conf), env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = nats_server("-t", "-c", str(conf), env={k: v for k, v in env.items()
                                                      if k != "JETSTREAM_KEY"})  # fmt: skip
    assert missing.returncode != 0 and "JETSTREAM_KEY" in missing.stdout + missing.stderr
    (conf.parent / "auth.conf").unlink()  # no Secret baton-nats-auth: no start
    missing = nats_server("-t", "-c", str(conf), env=env)
    assert missing.returncode != 0 and "auth.conf" in missing.stdout + missing.stderr


async def test_the_rendered_single_config_serves_creds_over_tls_only(tmp_path):
    import nats
    import nats.errors

    conf, env, ca, out = materialise("single", tmp_path)
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
        address = f"nats://127.0.0.1:{port}"
        nc = await nats.connect(address, tls=tls, allow_reconnect=False,
                                user_credentials=str(creds_path(out, "orchestrator")),
                                inbox_prefix=b"_INBOX_orchestrator")  # fmt: skip
        assert nc.is_connected
        await nc.close()
        # A tenant's identity works, inside its permissions only.
        violations: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            violations.append(exc)

        nc = await nats.connect(address, tls=tls, error_cb=on_error, allow_reconnect=False,
                                user_credentials=str(creds_path(out, tenants()[0])))  # fmt: skip
        await nc.subscribe("baton.jobs.>")
        await nc.flush()
        await asyncio.sleep(0.2)
        await nc.close()
        assert any("permissions violation" in str(e).lower() for e in violations), violations
        for url in [address, f"nats://orchestrator:password@127.0.0.1:{port}"]:
            with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
                await asyncio.wait_for(nats.connect(url, tls=tls, allow_reconnect=False), 5)
    finally:
        proc.terminate()
        proc.wait(10)
