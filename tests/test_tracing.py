"""OpenTelemetry across the fleet: one trace per task, exported over OTLP by
every service process to a real OTLP/HTTP receiver (``baton.dev.trace_receiver``:
an HTTP server decoding ``ExportTraceServiceRequest`` with
opentelemetry-proto), and the configuration rules of ``baton.tracing``."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton import tracing
from baton.dev.testing import Client, LocalStack, secure_nats, uid
from baton.dev.trace_receiver import ReceivedSpan, TraceReceiver, tree
from baton.natsd import NatsServer
from services.orchestrator import spans
from services.orchestrator.state import RunState, StepState
from tests.harness import http_post

SERVICES = {"baton-orchestrator", "baton-context-store", "baton-inference-worker",
            "baton-tool-worker"}  # fmt: skip


# -- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, []),  # off by default: nothing configured, nothing exported
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
    ],
)
def test_tracing_is_on_only_when_an_exporter_is_configured(
    env: dict[str, str], names: list[str]
) -> None:
    assert tracing.exporter_names(env) == names


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
        },
    ],
)
def test_an_exporter_baton_does_not_have_is_a_clear_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(tracing.TracingConfigError, match="not supported"):
        tracing.setup("test")
    assert not tracing.enabled()


def test_a_service_refuses_to_start_with_an_unknown_exporter(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {"OTEL_TRACES_EXPORTER": "zipkin", "BATON_NATS_URL": "nats://127.0.0.1:1",
           "BATON_ALLOW_NO_API_KEYS": "true",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "services.context_store"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert "OTEL_TRACES_EXPORTER='zipkin' is not supported" in out.stderr


PROBE = """
from baton import tracing
assert tracing.setup("probe")
with tracing.span("probe", attributes={"baton.task_id": "t1"}):
    pass
tracing.shutdown()
"""


def test_spans_go_out_over_grpc_when_the_protocol_says_so() -> None:
    """OTLP over gRPC, from another process, to a real gRPC TraceService."""
    import subprocess
    import sys
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    got: list[str] = []

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            got.extend(s.name for rs in request.resource_spans for ss in rs.scope_spans
                       for s in ss.spans)  # fmt: skip
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_INSECURE": "true"}  # fmt: skip
        out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
    finally:
        server.stop(None)
    assert got == ["probe"]


# -- the spans of a durable task (pure: no SDK needed) --------------------------


def _run(**kw: object) -> RunState:
    base: dict[str, object] = {"tenant": "acme", "task_id": "t1", "session": "t1",
                               "workflow": "research", "task_seq": 1, "created_at": 100.0,
                               "updated_at": 100.0,
                               "trace": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}  # fmt: skip
    base.update(kw)
    return RunState(**base)  # type: ignore[arg-type]


def _step(status: str, **kw: object) -> StepState:
    return StepState(agent="supervisor", pool="default", session="t1", status=status,  # type: ignore[arg-type]
                     dispatched_at=101.0, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_each_step_span_is_emitted_once_by_the_change_that_ends_it() -> None:
    running = _run(steps={"r1.plan": _step("dispatched")})
    done = _run(steps={"r1.plan": _step("done", finished_at=102.0),
                       "r1.gather.coding": _step("dispatched")})  # fmt: skip
    [plan] = spans.closed(running, done, now=103.0)
    root = spans.run_root(done)
    assert root is not None and root.trace_id == int("ab" * 16, 16)  # the caller's trace
    assert plan.name == "invoke_agent supervisor" and plan.parent == root
    assert (plan.start, plan.end) == (101.0, 102.0) and plan.error is None
    assert plan.context == spans.step_context(root, "acme", "t1", "r1.plan")
    assert plan.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert spans.closed(done, done, now=104.0) == []  # a replay emits nothing again


def test_a_run_that_ends_closes_its_open_steps_with_the_runs_error_and_itself() -> None:
    from proto.errors import ErrorCode
    from proto.messages import ErrorInfo

    before = _run(steps={"r1.plan": _step("done", finished_at=102.0),
                         "r1.gather.coding": _step("dispatched")})  # fmt: skip
    after = _run(steps=before.steps, status="cancelled", updated_at=105.0,
                 error=ErrorInfo.of(ErrorCode.CANCELLED, "cancelled by request"))  # fmt: skip
    got = {r.name: r for r in spans.closed(before, after, now=105.0)}
    assert set(got) == {"invoke_agent supervisor", "invoke_workflow research"}
    assert got["invoke_agent supervisor"].error == ("cancelled", "cancelled by request",
                                                    "orchestration")  # fmt: skip
    wf = got["invoke_workflow research"]
    assert (wf.start, wf.end) == (100.0, 105.0)
    assert wf.parent == tracing.remote(after.trace)  # the caller's span
    assert wf.context.trace_id == wf.parent.trace_id  # type: ignore[union-attr]
    assert wf.error is not None and wf.error[0] == "cancelled"


# -- one trace per task across the fleet -----------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[TraceReceiver]:
    with TraceReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced_stack(
    receiver: TraceReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, NatsServer]]:
    """A private stack whose services export spans to ``receiver``."""
    work = tmp_path_factory.mktemp("traced")
    server = secure_nats(work / "nats").start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "200"}  # fmt: skip
    stack = LocalStack(server, work / "stack", env=env)
    try:
        stack.start(tool_workers=1)
        yield stack, server
    finally:
        stack.stop()
        server.stop()


async def _finished(
    server: NatsServer, receiver: TraceReceiver, task_id: str, trace_id: str
) -> tuple[dict[str, Any], list[ReceivedSpan]]:
    """The task's terminal event (it must have completed) and its trace,
    once the task's root span arrived; the trace is printed as a tree."""
    client = await Client.connect(server.url)
    try:
        end = (await client.events("acme", task_id, timeout=60))[-1]
    finally:
        await client.close()
    assert end["type"] == "completed", end
    got = receiver.wait_for(trace_id, "invoke_workflow research")
    print("\n" + tree(got))
    return end, got


def _parents_resolve(trace: list[ReceivedSpan], outside: str) -> list[str]:
    """Spans whose parent is neither in the trace nor ``outside`` (the caller's)."""
    ids = {s.span_id for s in trace} | {outside}
    return [f"{s.name} [{s.service}]" for s in trace if s.parent_span_id not in ids]


async def test_a_research_task_over_http_is_one_trace_across_the_fleet(
    traced_stack: tuple[LocalStack, NatsServer], receiver: TraceReceiver
) -> None:
    stack, server = traced_stack
    trace_id, caller = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
    task_id = uid()
    accepted = http_post(f"{stack.orchestrator.url}/v1/tasks",
                         {"tenant": "acme", "workflow": "research", "task_id": task_id,
                          "input": "compare quicksort and mergesort"}, 202,
                         headers={"traceparent": f"00-{trace_id}-{caller}-01"})  # fmt: skip
    assert accepted["task_id"] == task_id
    end, got = await _finished(server, receiver, task_id, trace_id)
    assert {s.service for s in got} == SERVICES  # every service took part in the one trace
    assert _parents_resolve(got, caller) == []  # one tree, hung under the caller's span
    by_name: dict[str, list[ReceivedSpan]] = {}
    for s in got:
        by_name.setdefault(s.name, []).append(s)

    [http] = by_name["POST /v1/tasks"]
    assert http.parent_span_id == caller and http.kind == "SERVER"
    [root] = by_name["invoke_workflow research"]
    assert root.parent_span_id == http.span_id
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["gen_ai.conversation.id"] == task_id  # the session
    assert root.attributes["baton.task_id"] == task_id
    assert root.attributes["baton.cost_usd"] == pytest.approx(end["cost_usd"])
    assert root.attributes["gen_ai.usage.output_tokens"] == end["usage"]["completion_tokens"]

    agents = {s.attributes["gen_ai.agent.name"]: s for s in got
              if s.attributes.get("gen_ai.operation.name") == "invoke_agent"}  # fmt: skip
    assert set(agents) == {"supervisor", "retrieval", "coding", "validation"}
    assert all(a.parent_span_id == root.span_id for a in agents.values())
    chats = [s for s in got if s.name == "chat sim"]
    assert chats and all(c.service == "baton-inference-worker" for c in chats)
    agent_ids = {a.span_id for a in got if a.name.startswith("invoke_agent ")}
    for c in chats:
        assert c.parent_span_id in agent_ids  # the job was published in its step's span
        assert c.attributes["gen_ai.request.model"] == "sim"
        assert c.attributes["gen_ai.usage.input_tokens"] > 0
        assert c.attributes["gen_ai.usage.output_tokens"] > 0
    starts = {s.span_id: s.start_ns for s in got}
    late = [s.name for s in got if s.parent_span_id in agent_ids
            and s.start_ns < starts[s.parent_span_id] - 1_000_000]  # fmt: skip
    assert late == []  # a step's span opens at its first dispatch, before every turn and call
    tools = [s for s in got if s.attributes.get("gen_ai.operation.name") == "execute_tool"]
    assert {t.attributes["gen_ai.tool.name"] for t in tools} == {"search", "python"}
    assert all(t.parent_span_id in agent_ids and t.service == "baton-tool-worker" for t in tools)
    windows = [s for s in got if s.name == "context window"]
    jobs = {s.span_id for s in got if s.name in ("chat sim", "prewarm sim")}  # a warm reads one too
    assert windows and {w.parent_span_id for w in windows} <= jobs
    hops = by_name["process baton.results"]
    assert all(h.parent_span_id == root.span_id and h.links for h in hops)


async def _tap(client: Client, task_id: str) -> tuple[list[tuple[str, dict[str, str]]], object]:
    """Every job, result and event of ``task_id`` seen on the bus, with headers."""
    seen: list[tuple[str, dict[str, str]]] = []

    async def cb(msg) -> None:  # type: ignore[no-untyped-def]
        if task_id in msg.subject or (msg.headers or {}).get("Baton-Task-Id") == task_id:
            seen.append((msg.subject, dict(msg.headers or {})))

    subs = [await client.nc.subscribe(s, cb=cb)
            for s in ("baton.jobs.>", "baton.results.>", "baton.events.>")]  # fmt: skip
    await client.nc.flush()
    return seen, subs


async def test_tracing_off_passes_a_callers_trace_through_every_hop(
    stack: LocalStack, client: Client
) -> None:
    """The shared stack has no exporter, so no SDK: a task that came with a
    traceparent still carries its trace id on its jobs, results and events,
    and in the orchestrator's log lines."""
    trace_id = f"{random.getrandbits(128):032x}"
    task_id = uid()
    seen, subs = await _tap(client, task_id)
    http_post(f"{stack.orchestrator.url}/v1/tasks",
              {"tenant": "acme", "workflow": "chat", "task_id": task_id, "input": "hi"}, 202,
              headers={"traceparent": f"00-{trace_id}-{random.getrandbits(64):016x}-01"})  # fmt: skip
    assert (await client.events("acme", task_id, timeout=30))[-1]["type"] == "completed"
    for sub in subs:
        await sub.unsubscribe()  # type: ignore[attr-defined]
    kinds = {subject.split(".")[1] for subject, _ in seen}
    assert kinds == {"jobs", "results", "events"}
    assert all(h.get("traceparent", "").split("-")[1] == trace_id for _, h in seen), seen
    logged = [line for line in stack.orchestrator.log_path.read_text().splitlines()  # type: ignore[union-attr]
              if task_id in line and line.startswith("{")]  # fmt: skip
    assert logged and all(json.loads(line).get("trace_id") == trace_id for line in logged)


async def test_tracing_off_makes_up_no_trace_for_a_task_that_came_without_one(
    stack: LocalStack, client: Client
) -> None:
    task_id = uid()
    seen, subs = await _tap(client, task_id)
    await client.publish("chat", {"tenant": "acme", "input": "hi", "task_id": task_id},
                         msg_id=task_id)  # fmt: skip
    assert (await client.events("acme", task_id, timeout=30))[-1]["type"] == "completed"
    for sub in subs:
        await sub.unsubscribe()  # type: ignore[attr-defined]
    assert {subject.split(".")[1] for subject, _ in seen} == {"jobs", "results", "events"}
    assert [h for _, h in seen if "traceparent" in h] == []


async def test_steps_dispatched_by_another_replica_after_a_crash_stay_in_the_tasks_trace(
    traced_stack: tuple[LocalStack, NatsServer], receiver: TraceReceiver
) -> None:
    """The orchestrator stores r1.plan as done and dies before dispatching
    the fan-out (test hook); another replica, started afterwards, takes the
    redelivered result and dispatches the gather steps from the stored run:
    their spans and the workers' are in the trace the caller started."""
    stack, server = traced_stack
    stack.retire(stack.orchestrator)
    doomed = stack.service("orchestrator", BATON_TEST_CRASH_AFTER_COMMIT="r1.plan").wait_ready()
    trace_id, caller = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
    task_id = uid()
    http_post(f"{doomed.url}/v1/tasks", {"tenant": "acme", "workflow": "research",
                                         "task_id": task_id, "input": "hi"}, 202,
              headers={"traceparent": f"00-{trace_id}-{caller}-01"})  # fmt: skip
    for _ in range(400):
        if not doomed.alive():
            break
        await asyncio.sleep(0.05)
    assert not doomed.alive(), "the test hook never fired"
    stack.procs.remove(doomed)
    stack.service("orchestrator").wait_ready()
    _, got = await _finished(server, receiver, task_id, trace_id)
    [root] = [s for s in got if s.name == "invoke_workflow research"]
    gather = {s.attributes["baton.step"]: s for s in got if s.name.startswith("invoke_agent ")
              and ".gather." in s.attributes["baton.step"]}  # fmt: skip
    assert {"r1.gather.retrieval", "r1.gather.coding"} <= set(gather)
    assert all(g.parent_span_id == root.span_id for g in gather.values())
    chats = [s for s in got if s.name == "chat sim" and s.attributes["baton.step"] in gather]
    assert chats and {c.parent_span_id for c in chats} <= {g.span_id for g in gather.values()}


RESOURCE_PROBE = """
from baton import tracing
from opentelemetry import trace
assert tracing.setup("context-store")
print(dict(trace.get_tracer_provider().resource.attributes))
tracing.shutdown(0.1)
"""


@pytest.mark.parametrize(
    ("env", "name", "namespace"),
    [
        ({}, "baton-context-store", "baton"),
        ({"OTEL_SERVICE_NAME": "ctx"}, "ctx", "baton"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.namespace=prod,service.name=x"}, "x", "prod"),
    ],
)
def test_the_standard_variables_name_the_service(
    env: dict[str, str], name: str, namespace: str
) -> None:
    import ast
    import subprocess
    import sys

    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "OTEL_TRACES_EXPORTER": "console", **env}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", RESOURCE_PROBE], env=full, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    attrs = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert (attrs["service.name"], attrs["service.namespace"]) == (name, namespace)
