"""Property-based fuzzing of the pure decoding paths (no broker): the nesting
scan against msgspec, and task validation against hostile bodies. Every input
either decodes or is refused with a specific code; nothing else escapes.

Counts per entry point are printed (``-s``) and bounded by ``max_examples``;
``derandomize`` keeps CI reproducible.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import codec, nesting
from proto.errors import ErrorCode
from proto.ids import is_valid_id
from proto.messages import (
    ContextAppend,
    Heartbeat,
    InferenceJob,
    InferenceResult,
    RunTimer,
    TaskSubmit,
    WindowRequest,
)
from proto.submission import TaskRejected, parse_task

FUZZ = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WORKFLOWS = frozenset({"chat", "research"})
TALLY: dict[str, Counter[str]] = {}


def tally(entry: str, outcome: str) -> None:
    TALLY.setdefault(entry, Counter())[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    for entry, counts in sorted(TALLY.items()):
        print(f"\nfuzz {entry}: {sum(counts.values())} inputs {dict(counts)}")


def nested(depth: int, leaf: Any = 1, *, maps: bool = False) -> bytes:
    """``depth`` nested single-element arrays (or maps), built without recursion."""
    head = b"\x81\xa1k" if maps else b"\x91"
    return head * depth + msgspec.msgpack.encode(leaf)


def raw_str(b: bytes) -> bytes:
    """A MessagePack str whose bytes may be invalid UTF-8."""
    return (bytes([0xA0 | len(b)]) if len(b) < 32 else b"\xd9" + bytes([len(b)])) + b


def raw_map(items: list[tuple[bytes, bytes]]) -> bytes:
    return bytes([0x80 | len(items)]) + b"".join(k + v for k, v in items)


def depth_of(value: Any) -> int:
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            todo += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def wrap(value: Any, depth: int) -> Any:
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4), inner, max_size=4)
        | st.tuples(inner, st.integers(1, 40)).map(lambda t: wrap(*t))
    ),
    max_leaves=40,
)


# -- the nesting scan --------------------------------------------------------


@FUZZ
@given(json_like)
def test_scan_measures_the_depth_msgspec_sees(value: Any) -> None:
    data = msgspec.msgpack.encode(value)
    expect = depth_of(value)
    if expect > nesting.MAX_DEPTH:
        with pytest.raises(nesting.TooDeep):
            nesting.scan(data)
        tally("nesting.scan", "too_deep")
    else:
        assert nesting.scan(data).depth == expect
        tally("nesting.scan", "ok")


@FUZZ
@given(st.binary(max_size=64))
def test_scan_never_crashes_on_random_bytes_and_agrees_with_msgspec(data: bytes) -> None:
    try:
        nesting.scan(data)
        scanned = True
    except nesting.NestingError:
        scanned = False
    try:
        codec.decode_any(data)  # the codec: never anything but DecodeError
        decoded = True
    except codec.DecodeError:
        decoded = False
    if decoded:  # whatever msgspec reads (shallow here), the scan reads too
        assert scanned
    tally("nesting.scan", "random_ok" if scanned else "random_malformed")


@FUZZ
@given(json_like)
def test_a_body_called_shallow_is_never_deeper_than_the_limit(value: Any) -> None:
    """The fast path skips the scan only where the depth cannot exceed it."""
    data = msgspec.msgpack.encode(value)
    if nesting.shallow(data):
        assert depth_of(value) <= nesting.MAX_DEPTH
        tally("nesting.shallow", "skipped_scan")
    else:
        tally("nesting.shallow", "scanned")


def test_the_fast_path_leaves_deep_and_container_heavy_bodies_to_the_scan() -> None:
    assert not nesting.shallow(nested(nesting.MAX_DEPTH + 1))
    assert nesting.shallow(nested(nesting.MAX_DEPTH))
    # 40 one-item arrays side by side: shallow in fact, but 40 container bytes
    flat = msgspec.msgpack.encode([[1]] * 40)
    assert not nesting.shallow(flat)
    assert nesting.scan(flat).depth == 2
    # Non-ASCII text is full of bytes that could open a container: scanned, and fine.
    text = msgspec.msgpack.encode({"input": "ā" * 100})
    assert not nesting.shallow(text)
    assert codec.decode_any(text) == {"input": "ā" * 100}


@pytest.mark.parametrize("depth", [33, 1_000, 10_000, 200_000])
@pytest.mark.parametrize("maps", [False, True])
def test_deep_bodies_are_refused_without_recursion(depth: int, maps: bool) -> None:
    data = nested(depth, maps=maps)
    t0 = time.perf_counter()
    with pytest.raises(codec.TooDeep):
        codec.decode_any(data)
    with pytest.raises(codec.DecodeError):  # and the same through every typed decode
        codec.decode(data, InferenceResult)
    assert time.perf_counter() - t0 < 2.0


def test_truncated_and_reserved_bytes_are_malformed() -> None:
    for data in (b"", b"\x92\x01", b"\xdb\xff\xff\xff\xff", b"\xc1", b"\xdd\x00\x00\x00\x05\x01"):
        with pytest.raises(nesting.Malformed):
            nesting.scan(data)


def test_scan_reads_ids_stored_after_a_deep_value() -> None:
    body = raw_map([(raw_str(b"metadata"), nested(5000)), (raw_str(b"tenant"), raw_str(b"acme")),
                    (raw_str(b"task_id"), raw_str(b"t1"))])  # fmt: skip
    with pytest.raises(nesting.TooDeep) as exc:
        nesting.scan(body)
    assert exc.value.top == {"tenant": "acme", "task_id": "t1"}


def test_a_typical_job_scans_in_microseconds() -> None:
    """Not a benchmark: a guard that the scan stays cheap next to a decode."""
    from proto.messages import ContextRef

    job = codec.encode(InferenceJob(job_id="a.b.c", task_id="b", tenant="a", session="b",
                                    workflow="chat", step="c", agent="x",
                                    ref=ContextRef("a", "b", 3, b"s" * 16), max_tokens=64))  # fmt: skip
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        nesting.check(job)
    assert (time.perf_counter() - t0) / n < 200e-6


# -- task validation -----------------------------------------------------------

ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
bad_ids = st.one_of(
    st.text(max_size=70).filter(lambda s: not is_valid_id(s)),
    st.integers(-(2**63), 2**63),
    st.none(),
)


weird = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(), st.booleans(), st.none(),
    st.binary(max_size=16), st.lists(st.integers(-(2**63), 2**63), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63), max_size=3),
)  # fmt: skip


@st.composite
def task_bodies(draw: st.DrawFn, tenant: str | None = None) -> tuple[bytes, str]:
    """A task body, and the mutation applied to a valid one. With ``tenant``,
    every body names it and a fresh task id (for tests that read events back)."""
    task_id = draw(st.uuids().map(lambda u: f"f{u.hex[:20]}") if tenant else ids)
    body: dict[str, Any] = {
        "tenant": tenant or draw(ids),
        "task_id": task_id,
        "input": draw(st.text(max_size=32)),
    }
    kind = draw(st.sampled_from(["valid", "drop", "wrong_type", "bad_id", "non_finite", "huge_map",
                                 "deep", "bad_utf8", "extra", "budget", "not_a_map", "big_input"]))  # fmt: skip
    if kind == "drop":
        body.pop(draw(st.sampled_from(["tenant", "input"])))
    elif kind == "wrong_type":
        body[draw(st.sampled_from(["input", "budget", "metadata", "session"]))] = draw(weird)
    elif kind == "bad_id":
        body[draw(st.sampled_from(["tenant", "task_id", "session"]))] = draw(bad_ids)
    elif kind == "non_finite":
        body["budget"] = {"max_usd": draw(st.sampled_from([math.nan, math.inf, -math.inf]))}
    elif kind == "huge_map":
        body["metadata"] = {f"k{i}": i for i in range(draw(st.integers(33, 5000)))}
    elif kind == "budget":
        body["budget"] = {
            "max_tokens": draw(st.integers(-(2**40), 2**40)),
            "max_usd": draw(st.floats(-1e9, 1e9)),
        }
    elif kind == "extra":
        body[draw(st.text(max_size=8))] = draw(weird)
    elif kind == "big_input":
        body["input"] = "x" * draw(st.integers(65_537, 120_000))
    data = msgspec.msgpack.encode(body)
    if kind == "deep":
        depth = draw(st.integers(33, 50_000))
        data = raw_map([(raw_str(b"metadata"), nested(depth, maps=draw(st.booleans())))]
                       + [(raw_str(k.encode()), msgspec.msgpack.encode(v)) for k, v in body.items()])  # fmt: skip
    elif kind == "bad_utf8":
        field = draw(st.sampled_from([b"input", b"session"]))
        junk = draw(st.binary(min_size=1, max_size=8)) + b"\xff"
        data = raw_map([(raw_str(field), raw_str(junk))]
                       + [(raw_str(k.encode()), msgspec.msgpack.encode(v)) for k, v in body.items() if k.encode() != field])  # fmt: skip
    elif kind == "not_a_map":
        data = msgspec.msgpack.encode(draw(weird.filter(lambda v: not isinstance(v, dict))))
    return data, kind


EXPECTED: dict[str, set[ErrorCode]] = {
    "drop": {ErrorCode.MISSING_FIELD},
    "bad_id": {ErrorCode.INVALID_FIELD},
    "non_finite": {ErrorCode.INVALID_FIELD},
    "huge_map": {ErrorCode.INVALID_FIELD},
    "deep": {ErrorCode.TOO_DEEP},
    "bad_utf8": {ErrorCode.BAD_ENCODING},
    "not_a_map": {ErrorCode.BAD_ENCODING},
    "big_input": {ErrorCode.INPUT_TOO_LARGE},
}


@FUZZ
@given(task_bodies(tenant="acme"), st.sampled_from(sorted(WORKFLOWS)))
def test_every_task_body_is_accepted_or_refused_with_its_code(
    case: tuple[bytes, str], wf: str
) -> None:
    data, kind = case
    try:
        task = parse_task(data, tenant="acme", workflow=wf, known_workflows=WORKFLOWS,
                          fallback_task_id="seq1")  # fmt: skip
    except TaskRejected as r:
        assert kind != "valid", r
        if kind in EXPECTED:
            assert r.code in EXPECTED[kind], (kind, r)
        if kind in ("deep", "bad_utf8", "non_finite", "huge_map", "big_input", "budget"):
            assert r.addressable, (kind, r)  # the ids were fine: the client hears why
        tally("baton.tasks", str(r.code) + ("" if r.addressable else "/unaddressable"))
        return
    assert kind in ("valid", "wrong_type", "extra", "budget", "bad_id"), kind
    assert isinstance(task, TaskSubmit) and task.task_id
    tally("baton.tasks", "accepted")


# -- the internal messages every service decodes --------------------------------

INTERNAL = [InferenceJob, InferenceResult, Heartbeat, RunTimer, ContextAppend, WindowRequest]


@FUZZ
@given(st.sampled_from(INTERNAL), st.one_of(json_like, st.binary(max_size=64),
       st.integers(33, 20_000).map(nested)))  # fmt: skip
def test_internal_messages_decode_or_raise_decode_error(type_: type[Any], value: Any) -> None:
    data = value if isinstance(value, bytes) else msgspec.msgpack.encode(value)
    try:
        codec.decode(data, type_)
        tally(f"decode {type_.__name__}", "ok")
    except codec.DecodeError as exc:
        tally(f"decode {type_.__name__}", type(exc).__name__)
