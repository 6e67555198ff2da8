"""A task's free-form ``metadata`` must read back as JSON: admission refuses
MessagePack extension values, binary, non-string keys and non-finite floats
(on the bus and over HTTP, ``invalid_field``), and a task stored before that
rule never breaks its tenant's task list."""

from __future__ import annotations

import datetime as dt
import json
import math
import urllib.error
import urllib.request
from typing import Any

import msgpack
import msgspec
import pytest

from baton.bus import Bus
from baton.dev.testing import Client, LocalStack, http_json, uid
from proto.errors import ErrorCode
from proto.jsonvalue import json_problem, json_safe
from proto.streams import RUNS
from proto.submission import TaskRejected, parse_task
from services.orchestrator.runs import RunStore
from services.orchestrator.state import RunState

NOT_JSON: list[tuple[Any, str]] = [
    ({"x": msgspec.msgpack.Ext(5, b"abc")}, "Ext"),
    ({"x": [1, {"y": b"\x00\x01"}]}, "binary"),
    ({"x": {1: "a"}}, "int key"),
    ({"x": {"y": math.nan}}, "nan"),
    ({"x": -math.inf}, "inf"),
    ({"x": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}, "datetime"),
]


@pytest.mark.parametrize(("metadata", "what"), NOT_JSON)
def test_values_json_cannot_hold_are_named(metadata: dict[str, Any], what: str) -> None:
    why = json_problem(metadata)
    assert why is not None and why.startswith("metadata"), what
    json.dumps(json_safe(metadata), allow_nan=False)  # the placeholder renders


def test_json_values_pass_and_are_kept_as_they_are() -> None:
    value = {"a": [1, 2.5, "x", None, True, {"b": {"c": []}}], "n": -(2**63)}
    assert json_problem(value) is None
    assert json_safe(value) == value


def _body(metadata_packed: bytes, task_id: str) -> bytes:
    """A task body whose metadata is already-packed MessagePack (as another
    client's library would write it)."""
    head = msgpack.packb({"tenant": "acme", "input": "hi", "task_id": task_id})
    # A fixmap of 3 entries becomes 4: append the metadata pair.
    assert head[0] == 0x83
    return bytes([0x84]) + head[1:] + msgpack.packb("metadata") + metadata_packed


def test_admission_refuses_an_extension_value_in_metadata() -> None:
    packed = msgpack.packb({"k": msgpack.ExtType(7, b"\x01\x02")})
    with pytest.raises(TaskRejected) as caught:
        parse_task(_body(packed, "t1"), tenant="acme", workflow="chat", known_workflows={"chat"})
    assert caught.value.code == ErrorCode.INVALID_FIELD and caught.value.addressable
    assert "metadata.k" in caught.value.message


def test_admission_refuses_a_map_keyed_by_numbers_in_metadata() -> None:
    packed = msgpack.packb({"k": {1: "one"}})
    with pytest.raises(TaskRejected) as caught:
        parse_task(_body(packed, "t1"), tenant="acme", workflow="chat", known_workflows={"chat"})
    assert caught.value.code == ErrorCode.INVALID_FIELD


async def test_a_task_with_extension_metadata_fails_on_the_bus(
    stack: LocalStack, client: Client
) -> None:
    task_id = uid()
    body = _body(msgpack.packb({"k": msgpack.ExtType(7, b"\x01")}), task_id)
    await client.publish("chat", body, msg_id=task_id, raw=True)
    events = await client.events("acme", task_id)
    assert events[-1]["type"] == "failed"
    assert events[-1]["error"]["code"] == "invalid_field", events[-1]


def _post(url: str, raw_json: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, raw_json.encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_http_refuses_non_finite_metadata(stack: LocalStack) -> None:
    # Python's JSON parser (FastAPI's) accepts the NaN literal; JSON does not.
    status, doc = _post(f"{stack.orchestrator.url}/v1/tasks",
                        '{"tenant": "acme", "input": "x", "metadata": {"a": NaN}}')  # fmt: skip
    assert status == 400 and doc["error"]["code"] == "invalid_field", doc


async def test_a_stored_task_with_unrenderable_metadata_does_not_break_the_list(
    stack: LocalStack, bus: Bus
) -> None:
    tenant, task_id = "lister", uid()
    runs = RunStore(await bus.ensure_bucket(RUNS))
    # Stored the old way: straight into the run store, past admission.
    bad = {"k": msgspec.msgpack.Ext(9, b"xyz"), "b": b"\x00", "n": math.nan}
    await runs.write(RunState(tenant=tenant, task_id=task_id, session=task_id, workflow="chat",
                              task_seq=1, status="completed", metadata=bad), None)  # fmt: skip
    base = stack.orchestrator.url
    page = http_json(f"{base}/v1/tasks?tenant={tenant}")
    assert task_id in [t["task_id"] for t in page["tasks"]]
    one = http_json(f"{base}/v1/tasks/{task_id}?tenant={tenant}")
    assert one["metadata"] == {"k": "<Ext>", "b": "<1 bytes>", "n": "nan"}
