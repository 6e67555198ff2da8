"""The v1 contract: ids, subjects, admission codes, codec interop, AsyncAPI drift."""

from __future__ import annotations

import msgpack
import msgspec
import pytest
import yaml

from proto import codec, subjects
from proto.asyncapi import DOCUMENT_PATH, build
from proto.errors import LAYER_OF, ErrorCode
from proto.ids import is_valid_id
from proto.messages import (
    Completed,
    ContextRef,
    ErrorInfo,
    Failed,
    InferenceJob,
    TaskEvent,
    TaskSubmit,
    Usage,
)
from proto.sizes import MAX_DOCUMENT_BYTES, MAX_INPUT_BYTES, document_too_large
from proto.submission import TaskRejected, parse_task

KNOWN = frozenset({"chat", "research"})


@pytest.mark.parametrize("good", ["acme", "a", "A-b_9", "x" * 64])
def test_valid_ids_are_accepted(good: str) -> None:
    assert is_valid_id(good)


@pytest.mark.parametrize("bad", ["", "x" * 65, "a.b", "a b", "a*", "a>", "ü", None, 5])
def test_invalid_ids_are_refused(bad: object) -> None:
    assert not is_valid_id(bad)


def test_subject_builders_refuse_tokens_that_would_break_routing() -> None:
    assert subjects.event("acme", "t1") == "baton.events.acme.t1"
    with pytest.raises(ValueError, match="tenant"):
        subjects.event("ac.me", "t1")
    with pytest.raises(ValueError, match="workflow"):
        subjects.task("chat.>")


def parse(body: object, workflow: str = "chat", tenant: str = "acme", **kw: object) -> TaskSubmit:
    data = body if isinstance(body, bytes) else msgpack.packb(body)
    return parse_task(data, tenant=tenant, workflow=workflow, known_workflows=KNOWN, **kw)  # type: ignore[arg-type]


def test_parse_task_fills_task_id_from_header_and_session_from_task_id() -> None:
    task = parse({"tenant": "acme", "input": "hi"}, msg_id="m1")
    assert (task.task_id, task.session) == ("m1", "m1")
    task = parse({"tenant": "acme", "input": "hi"}, fallback_task_id="seq7")
    assert task.task_id == "seq7"


def test_parse_task_reads_the_body_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass over the bytes (the nesting bound runs once per parse of
    them): the typed task is validated from the untyped decode, not decoded
    again (#23: a task submitted over HTTP was decoded four times)."""
    passes: list[int] = []
    check = codec.nesting.check
    monkeypatch.setattr(codec.nesting, "check", lambda data: passes.append(1) or check(data))
    task = parse({"tenant": "acme", "input": "hi", "budget": {"max_tokens": 9}}, msg_id="m1")
    assert task.budget is not None and task.budget.max_tokens == 9 and len(passes) == 1


@pytest.mark.parametrize(
    ("body", "workflow", "code", "addressable"),
    [
        (b"\xc1\xff not msgpack", "chat", ErrorCode.BAD_ENCODING, False),
        ([1, 2, 3], "chat", ErrorCode.BAD_ENCODING, False),
        # The tenant comes from the subject, so even a body without one is answered.
        ({"input": "hi", "task_id": "t1"}, "chat", ErrorCode.MISSING_FIELD, True),
        ({"tenant": "acme", "task_id": "t1"}, "chat", ErrorCode.MISSING_FIELD, True),
        ({"tenant": "acme", "task_id": "t1", "input": 42}, "chat", ErrorCode.INVALID_FIELD, True),
        ({"tenant": "ac.me", "task_id": "t1", "input": "x"}, "chat", ErrorCode.INVALID_FIELD, True),
        ({"tenant": "globex", "task_id": "t1", "input": "x"}, "chat", ErrorCode.FORBIDDEN, True),
        ({"tenant": "acme", "task_id": "t1", "input": "x"}, "nope", ErrorCode.UNKNOWN_WORKFLOW, True),
        (
            {"tenant": "acme", "task_id": "t1", "input": "x" * (MAX_INPUT_BYTES + 1)},
            "chat", ErrorCode.INPUT_TOO_LARGE, True,
        ),
        (
            {"tenant": "acme", "task_id": "t1", "input": "x", "budget": {"max_tokens": -1}},
            "chat", ErrorCode.INVALID_FIELD, True,
        ),
    ],
)  # fmt: skip
def test_bad_tasks_are_rejected_with_a_specific_code(
    body: object, workflow: str, code: ErrorCode, addressable: bool
) -> None:
    with pytest.raises(TaskRejected) as info:
        parse(body, workflow)
    assert info.value.code == code
    assert info.value.addressable is addressable
    assert info.value.tenant in (None, "acme")  # never the body's tenant
    if code != ErrorCode.FORBIDDEN:  # forbidden is shared with the context layer
        assert LAYER_OF[code] == "orchestration"


@pytest.mark.parametrize(
    "budget",
    [{"max_usd": float("nan")}, {"max_usd": float("inf")}, {"max_usd": float("-inf")},
     {"max_usd": -0.5}, {"max_usd": 0.0}, {"max_tokens": 0}, {"max_tokens": 10, "max_usd": -1e-9}],
)  # fmt: skip
def test_budgets_that_cannot_be_enforced_are_invalid_fields(budget: dict[str, float]) -> None:
    with pytest.raises(TaskRejected) as info:
        parse({"tenant": "acme", "task_id": "t1", "input": "x", "budget": budget})
    assert info.value.code == ErrorCode.INVALID_FIELD and info.value.addressable
    assert "budget." in info.value.message


def test_finite_positive_budgets_are_accepted() -> None:
    body = {"tenant": "acme", "task_id": "t1", "input": "x",
            "budget": {"max_usd": 1e-6, "max_tokens": 1}}  # fmt: skip
    task = parse(body)
    assert task.budget is not None and task.budget.max_usd == 1e-6


def test_every_error_code_has_a_layer() -> None:
    assert set(LAYER_OF) == set(ErrorCode)


def test_an_unknown_code_layer_or_step_status_does_not_decode() -> None:
    good = {"type": "failed", "task_id": "t1",
            "error": {"code": "bad_ref", "message": "m", "layer": "context"}}  # fmt: skip
    event = codec.decode(msgpack.packb(good), TaskEvent)
    assert isinstance(event, Failed) and event.error.code is ErrorCode.BAD_REF
    for bad in ({**good["error"], "code": "bad_reff"}, {**good["error"], "layer": "gpu"}):
        with pytest.raises(msgspec.ValidationError):
            codec.decode(msgpack.packb({**good, "error": bad}), TaskEvent)
    step = {"type": "step", "task_id": "t1", "step": "r1.a", "agent": "a", "status": "begun"}
    with pytest.raises(msgspec.ValidationError):
        codec.decode(msgpack.packb(step), TaskEvent)


def test_an_error_info_takes_its_layer_from_its_code() -> None:
    assert ErrorInfo.of(ErrorCode.TOOL_TIMEOUT, "slow").layer == "tool"


def test_msgpack_package_encodes_what_baton_decodes() -> None:
    body = {"tenant": "acme", "input": "hello", "budget": {"max_tokens": 100, "max_usd": 0.5},
            "metadata": {"k": [1, 2]}}  # fmt: skip
    task = codec.decode(msgpack.packb(body), TaskSubmit)
    assert task.tenant == "acme" and task.budget is not None and task.budget.max_usd == 0.5
    assert task.metadata == {"k": [1, 2]}


def test_baton_encodes_what_msgpack_package_decodes_byte_for_byte() -> None:
    ev = Completed(task_id="t1", session="s1", tenant="acme", ts=1.5, output="ok",
                   usage=Usage(prompt_tokens=3, completion_tokens=4, gpu_seconds=0.1),
                   cost_usd=0.25)  # fmt: skip
    data = codec.encode(ev)
    plain = msgpack.unpackb(data)
    assert plain["type"] == "completed"
    assert plain["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "gpu_seconds": 0.1,
                              "tool_cpu_seconds": 0.0}  # fmt: skip
    assert msgpack.packb(plain) == data  # same bytes from both codecs
    assert codec.decode(msgpack.packb(plain), TaskEvent) == ev


def test_failed_event_carries_code_message_and_layer() -> None:
    data = codec.encode(
        Failed(task_id="t", error={"code": "x", "message": "m", "layer": "context"})
    )  # type: ignore[arg-type]
    assert msgpack.unpackb(data)["error"] == {"code": "x", "message": "m", "layer": "context"}


def test_a_context_ref_stays_small_and_a_job_carries_no_history() -> None:
    ref = ContextRef("t" * 64, "s" * 64, 10**9, b"\x00" * 16)
    assert len(codec.encode(ref)) < 160
    job = InferenceJob(job_id="a.b.s1", task_id="b", tenant="a", session="c", workflow="chat",
                       step="s1", agent="assistant", ref=ref, max_tokens=128)  # fmt: skip
    assert len(codec.encode(job)) < 512


def test_asyncapi_document_matches_the_types() -> None:
    assert yaml.safe_load(DOCUMENT_PATH.read_text()) == build(), "run `baton asyncapi`"


def test_asyncapi_documents_every_message_struct() -> None:
    import proto.messages as m

    structs = {
        name for name, obj in vars(m).items()
        if isinstance(obj, type) and issubclass(obj, msgspec.Struct) and not name.startswith("_")
    }  # fmt: skip
    documented = set(build()["components"]["schemas"])
    assert structs - {"Budget", "Usage", "ErrorInfo", "ChatMessage"} <= documented
    assert {"Budget", "Usage", "ErrorInfo", "ChatMessage"} <= documented


def test_a_document_is_measured_in_utf8_bytes_of_title_and_text() -> None:
    assert document_too_large("t", "x" * (MAX_DOCUMENT_BYTES - 1)) is None
    assert document_too_large("", "x" * MAX_DOCUMENT_BYTES) is None
    assert document_too_large("é", "x" * (MAX_DOCUMENT_BYTES - 1)) == (
        f"a document is at most {MAX_DOCUMENT_BYTES} bytes"  # "é" is two bytes
    )
