"""JetStream encrypted at rest (the dev default of `make up`): a task's input
and answer are served, yet no byte of them is in nats-server's store files;
the same task on an unencrypted server leaves them there (so the check bites)."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton.dev.testing import Client, LocalStack, http_json, secure_nats, uid
from tests.ctx import raw_store_contains


@pytest.mark.parametrize("encrypt", [True, False])
async def test_the_store_files_hold_no_plaintext_while_the_task_is_served(
    tmp_path: Path, encrypt: bool
) -> None:
    server = secure_nats(tmp_path / "nats", encrypt=encrypt).start()
    stack = LocalStack(server, tmp_path / "stack", env={"BATON_TENANTS": "acme"}).start()
    try:
        client = await Client.connect(server.url_for("acme"), tenant="acme")
        secret, task_id = uid("PLAINTEXT"), uid()
        try:
            done = await client.run("chat", {"tenant": "acme", "input": f"remember {secret}",
                                             "task_id": task_id})  # fmt: skip
        finally:
            await client.close()
        assert done["type"] == "completed"
        # Still served: the history holds the input, read back through the store.
        store = next(p for p in stack.procs if p.name == "context-store")
        history = http_json(f"{store.url}/v1/sessions/acme/{done['session']}")
        assert any(secret in m["content"] for m in history["messages"])
        found = raw_store_contains(server.store_dir / "jetstream", secret.encode())
        if encrypt:
            assert found == [], found
        else:
            assert found  # the control: the same bytes in the clear
    finally:
        stack.stop()
        server.stop()
