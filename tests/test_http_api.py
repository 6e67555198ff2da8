"""Baton's own HTTP API as a client sees it: one error body on every error
path, response models in the OpenAPI document, ``duplicate`` on submit,
task listing with filters and paging, SSE ids and Last-Event-ID resume."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from baton.dev.testing import Client, LocalStack, http_get, http_json, uid
from tests.harness import http_post


def _error_of(url: str, *, method: str = "GET", body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:  # fmt: skip
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})},
                                 method=method)  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raise AssertionError(f"{method} {url} succeeded with {r.status}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _assert_one_shape(doc: dict[str, Any], code: str) -> None:
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) == {"code", "message", "layer", "type", "param"}, err
    assert err["code"] == code, err
    assert err["layer"] == "orchestration" and err["message"]


def sse_events(text: str) -> list[dict[str, str]]:
    """Parse an SSE body into its events (comments dropped)."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        ev: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            k, v = line.split(":", 1)
            ev[k] = v[1:] if v.startswith(" ") else v
        if ev:
            out.append(ev)
    return out


def sse_get(url: str, headers: dict[str, str] | None = None) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(r.read().decode())


async def test_every_error_path_returns_the_one_error_body(stack: LocalStack) -> None:
    base = stack.orchestrator.url
    tenant = "acme"
    cases = [
        (dict(url=f"{base}/v1/tasks", method="POST", body={"tenant": tenant}), 422, "missing_field"),
        (dict(url=f"{base}/v1/tasks", method="POST", body={"tenant": tenant, "input": 3}), 422, "invalid_field"),
        (dict(url=f"{base}/v1/tasks", method="POST", body={"tenant": "a.b", "input": "x"}), 400, "invalid_field"),
        (dict(url=f"{base}/v1/tasks", method="POST", body={"tenant": tenant, "input": "x", "workflow": "nope"}), 404, "unknown_workflow"),
        (dict(url=f"{base}/v1/tasks", method="POST", body={"tenant": tenant, "input": "x" * 70_000}), 413, "input_too_large"),
        (dict(url=f"{base}/v1/tasks/{uid()}?tenant={tenant}"), 404, "unknown_task"),
        (dict(url=f"{base}/v1/tasks/{uid()}"), 400, "missing_field"),
        (dict(url=f"{base}/v1/tasks/{uid()}/events?tenant={tenant}"), 404, "unknown_task"),
        (dict(url=f"{base}/v1/tasks/{uid()}/cancel?tenant={tenant}", method="POST", body={}), 404, "unknown_task"),
        (dict(url=f"{base}/v1/tasks?tenant={tenant}&cursor=%%%"), 400, "invalid_field"),
        (dict(url=f"{base}/v1/tasks?tenant={tenant}&status=sleeping"), 422, "invalid_field"),
        (dict(url=f"{base}/v1/tasks?tenant={tenant}&limit=0"), 422, "invalid_field"),
        (dict(url=f"{base}/v1/no-such-route"), 404, "invalid_field"),
    ]  # fmt: skip
    for kwargs, status, code in cases:
        got_status, doc = _error_of(**kwargs)  # type: ignore[arg-type]
        assert got_status == status, (kwargs, doc)
        _assert_one_shape(doc, code)
    # A validation error names the field it is about.
    _, doc = _error_of(f"{base}/v1/tasks", method="POST", body={"tenant": tenant})
    assert doc["error"]["param"] == "input"


async def test_api_key_errors_use_the_one_body_and_openapi_declares_the_scheme(
    stack: LocalStack,
) -> None:
    orch = stack.service("orchestrator", BATON_API_KEYS=json.dumps({"k1": "acme"})).wait_ready()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, doc = _error_of(f"{orch.url}/v1/tasks", headers=headers)
            assert status == 401
            _assert_one_shape(doc, "unauthorized")
        spec = http_json(f"{orch.url}/openapi.json")
        assert spec["components"]["securitySchemes"]["apiKey"] == {
            "type": "http", "scheme": "bearer",
            "description": "A Baton API key: `Authorization: Bearer <key>`.",
        }  # fmt: skip
        for path in ("/v1/tasks", "/v1/tasks/{task_id}", "/v1/chat/completions"):
            for op in spec["paths"][path].values():
                assert {"apiKey": []} in op["security"], path
        # Every JSON 2xx body is described by a schema, and errors by the one body.
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
                content = ok.get("content", {})
                if "application/json" in content:
                    assert content["application/json"]["schema"], (method, path)
                if path.startswith("/v1/"):
                    ref = op["responses"]["404"]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorBody"), (method, path)
    finally:
        orch.terminate()
        stack.procs.remove(orch)


async def test_submit_reports_duplicate_false_first_then_true(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "globex", uid()
    body = {"tenant": tenant, "input": "once", "task_id": task_id}
    first = http_post(f"{stack.orchestrator.url}/v1/tasks", body, 202)
    assert first["duplicate"] is False
    assert first["tokens_subject"] == f"baton.tokens.{tenant}.{task_id}"
    second = http_post(f"{stack.orchestrator.url}/v1/tasks", body, 202)
    assert second["duplicate"] is True
    await client.events(tenant, task_id)


async def test_tasks_are_listed_newest_first_with_filters_and_stable_pages(
    stack: LocalStack, client: Client
) -> None:
    base = stack.orchestrator.url
    tenant = "lister"
    ids = []
    for i in range(5):
        task_id = uid()
        ids.append(task_id)
        await client.run("chat", {"tenant": tenant, "input": f"hi {i}", "task_id": task_id})
        if i == 1:
            mid = time.time()
    research = uid()
    await client.run("research", {"tenant": tenant, "input": "plan", "task_id": research})
    other = "acme"
    await client.run("chat", {"tenant": other, "input": "not yours", "task_id": uid()})

    everything = http_json(f"{base}/v1/tasks?tenant={tenant}")
    assert [t["task_id"] for t in everything["tasks"]] == [research, *reversed(ids)]
    assert everything["next_cursor"] is None
    assert {t["status"] for t in everything["tasks"]} == {"completed"}

    chats = http_json(f"{base}/v1/tasks?tenant={tenant}&workflow=chat")["tasks"]
    assert [t["task_id"] for t in chats] == list(reversed(ids))
    assert http_json(f"{base}/v1/tasks?tenant={tenant}&status=running")["tasks"] == []
    recent = http_json(f"{base}/v1/tasks?tenant={tenant}&since={mid}")["tasks"]
    assert [t["task_id"] for t in recent] == [research, *reversed(ids[2:])]

    seen, cursor = [], None
    for _ in range(10):
        url = f"{base}/v1/tasks?tenant={tenant}&limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = http_json(url)
        assert len(page["tasks"]) <= 2
        seen += [t["task_id"] for t in page["tasks"]]
        if page["next_cursor"] is None:
            break
        if cursor is None:  # a task arriving between pages does not shift the next one
            await client.run("chat", {"tenant": tenant, "input": "late", "task_id": uid()})
        cursor = page["next_cursor"]
    assert seen == [research, *reversed(ids)]


async def test_sse_event_ids_are_sequences_and_last_event_id_resumes_after_one(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "initech", uid()
    await client.run("chat", {"tenant": tenant, "input": "hello", "task_id": task_id})
    url = f"{stack.orchestrator.url}/v1/tasks/{task_id}/events?tenant={tenant}"
    full = sse_events(await asyncio.to_thread(sse_get, url))
    kinds = [e["event"] for e in full]
    assert kinds[0] == "accepted" and kinds[-1] == "completed" and len(full) >= 4
    seqs = [int(e["id"]) for e in full]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for e in full:
        assert json.loads(e["data"])["type"] == e["event"]
    resumed = sse_events(await asyncio.to_thread(sse_get, url, {"Last-Event-ID": full[1]["id"]}))
    assert resumed == full[2:]
    status, doc = await asyncio.to_thread(_error_of, url, headers={"Last-Event-ID": "abc"})
    assert status == 400 and doc["error"]["param"] == "Last-Event-ID"


@pytest.mark.parametrize("path", ["/v1/workflows", "/v1/models"])
async def test_workflows_are_listed_with_descriptions(stack: LocalStack, path: str) -> None:
    doc = json.loads(http_get(f"{stack.orchestrator.url}{path}"))
    items = doc.get("workflows") or doc.get("data")
    names = {w.get("name") or w.get("id"): w["description"] for w in items}
    assert set(names) >= {"chat", "research"}
    assert names["chat"].startswith("A single assistant")
