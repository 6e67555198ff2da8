"""A tenant deleted at run time stays deleted when ``baton up`` restarts
with BATON_TENANTS still listing it: real ``baton up`` processes (embedded
nats-server in operator mode, the services), the real ``baton tenant
delete``. After the restart its old ``.creds`` are refused, no account JWT
of it is in the resolver, none of its streams exists (on the server or in the
store's files), ``baton up`` says it skipped it, and an orchestrator started
with it in BATON_TENANTS skips it too (the registry's tombstone). A tenant
of BATON_TENANTS rotated with ``baton tenant rotate`` keeps its new HTTP API
key across the restart: ``tenants/<t>.key`` holds it and it is accepted, the
refused old key is never written back."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import nats
import nats.errors
import pytest

from baton import accounts
from baton.bus import NotFound, connect
from baton.credentials import Credentials
from baton.dev.testing import TEST_ENV, Client, uid
from baton.stack import ServiceProcess
from baton.urls import with_creds
from proto import streams
from tests.test_stack import Up, _get, baton_up

pytestmark = pytest.mark.timeout(240)


def _stop(up: Up) -> None:
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(60) == 0, up.lines


def _stream_dirs(store: Path) -> dict[str, set[str]]:
    """account (its public key) -> the streams it has files for."""
    out: dict[str, set[str]] = {}
    for streams_dir in (store / "jetstream").glob("**/streams"):
        out[streams_dir.parent.name] = {p.name for p in streams_dir.iterdir()}
    return out


async def test_a_deleted_tenant_stays_deleted_and_a_rotated_key_stays_new_across_baton_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATON_TENANTS", "acme,doomed")
    data = tmp_path / "data"
    with baton_up(data) as up:
        up.wait_for("baton: try:")
        address = f"nats://127.0.0.1:{up.nats_port}"
        client = await Client.connect(with_creds(address, data / "tenants" / "doomed.creds"),
                                      tenant="doomed")  # fmt: skip
        try:
            done = await client.run("chat", {"tenant": "doomed", "input": "hi", "task_id": uid()})
        finally:
            await client.close()
        assert done["type"] == "completed", done
        doomed_pub = Credentials.load_or_create(data, []).keys().account("doomed")
        store = data / "nats"
        before = _stream_dirs(store)
        assert "BATON_EVENTS" in before[doomed_pub], before  # what must be gone can be seen
        assert any(streams.tenant_tasks("doomed").name in s for s in before.values()), before
        old_creds = tmp_path / "old.creds"
        old_creds.write_bytes((data / "tenants" / "doomed.creds").read_bytes())
        out = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "baton.cli", "tenant", "delete",
            "doomed", "--data-dir", str(data),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(out.communicate(), 90)
        assert out.returncode == 0, stderr.decode()
        assert b"tenant deleted" in stdout
        # The orchestrator stops the loops it ran for it since its start
        # (left running, they would ask the deleted stream forever).
        up.wait_for('"tenant_loops_stopped"')
        (stopped,) = [ln for ln in up.lines if '"tenant_loops_stopped"' in ln]
        assert '"tenant": "doomed"' in stopped and '"loops": 2' in stopped, stopped
        old_key = (data / "tenants" / "acme.key").read_text().strip()
        out = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "baton.cli", "tenant", "rotate", "acme", "--data-dir", str(data),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(out.communicate(), 90)
        assert out.returncode == 0, stderr.decode()
        new_key = stdout.decode().splitlines()[1]
        assert new_key.startswith("bk-") and new_key != old_key
        _stop(up)
    with baton_up(data, nats_port=up.nats_port) as again:
        again.wait_for("baton: try:")
        # No account JWT of it: not preloaded, not in the resolver's directory.
        assert doomed_pub not in (store / "nats-server.conf").read_text()
        assert not list((store / "jwt").glob(f"{doomed_pub}.jwt*"))
        with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
            await nats.connect(address, user_credentials=str(old_creds), allow_reconnect=False,
                               connect_timeout=2)  # fmt: skip
        assert not (data / "tenants" / "doomed.creds").exists()
        # None of its streams, on the server or in the files.
        files = _stream_dirs(store)
        assert doomed_pub not in files, files
        assert not any(streams.tenant_tasks("doomed").name in s for s in files.values()), files
        bus = await connect(with_creds(address, data / "operator.creds"), name="test-restart")
        try:
            with pytest.raises(NotFound):
                await bus.stream_info(streams.tenant_tasks("doomed").name)
            # An orchestrator that still lists it (a k8s ConfigMap) skips it too.
            log = tmp_path / "orchestrator.log"
            orch = ServiceProcess(
                accounts.ORCHESTRATOR,
                {**TEST_ENV, "BATON_TENANTS": "acme,doomed", "BATON_DATA_DIR": str(data),
                 "BATON_NATS_URL": with_creds(address, data / "secrets" / "creds" /
                                              "orchestrator.creds")},
                log_path=log,
            ).start()  # fmt: skip
            try:
                orch.wait_ready()
                lines = [json.loads(ln) for ln in log.read_text().splitlines()
                         if ln.startswith("{")]  # fmt: skip
                skipped = [ln for ln in lines if ln.get("event") == "tenant_deleted_skipped"]
                assert [ln["tenant"] for ln in skipped] == ["doomed"], lines
                with pytest.raises(NotFound):
                    await bus.stream_info(streams.tenant_tasks("doomed").name)
            finally:
                orch.terminate()
        finally:
            await bus.close()
        # acme is served as before.
        client = await Client.connect(with_creds(address, data / "tenants" / "acme.creds"),
                                      tenant="acme")  # fmt: skip
        try:
            done = await client.run("chat", {"tenant": "acme", "input": "hi", "task_id": uid()})
        finally:
            await client.close()
        assert done["type"] == "completed", done
        # The rotated key is the one configured and written, the old one refused.
        assert (data / "tenants" / "acme.key").read_text().strip() == new_key
        tasks = f"http://127.0.0.1:{again.http_port}/v1/tasks"
        assert _get(tasks, new_key)[0] == 200
        assert _get(tasks, old_key)[0] == 401
        said = [ln for ln in again.lines if "doomed" in ln]
        assert any("was deleted" in ln and "skipped" in ln for ln in said), again.lines
        _stop(again)
