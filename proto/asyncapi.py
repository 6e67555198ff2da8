"""The AsyncAPI 3.0 document of every Baton subject, built from the types.

``proto/asyncapi.yaml`` is this document rendered; a test fails when they
differ (regenerate with ``baton asyncapi``). Pure: no file is written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import msgspec
import yaml

from proto import context_api, streams, subjects
from proto import messages as msg
from proto.ids import ID_PATTERN

DOCUMENT_PATH: Final = Path(__file__).with_name("asyncapi.yaml")

_ID = {"type": "string", "pattern": ID_PATTERN}

# channel name -> (address, parameters, message types, description, public?)
_CHANNELS: Final[dict[str, tuple[str, tuple[str, ...], tuple[Any, ...], str, bool]]] = {
    "tasks": (
        f"{subjects.TASKS}.{{workflow}}", ("workflow",), (msg.TaskSubmit,),
        "Submit a task, from the tenant's own account (its credentials decide the tenant). "
        f"It arrives in Baton's account as baton.tasks.<tenant>.<workflow>, on stream "
        f"{streams.TASKS_PREFIX}<tenant>. Header Nats-Msg-Id: <task_id> de-duplicates within "
        "the stream's window, per tenant. An optional W3C traceparent (and tracestate) header "
        "makes the task part of that trace (OpenTelemetry, docs/tracing.md).", True,
    ),
    "input": (
        f"{subjects.INPUT}.{{task_id}}", ("task_id",), (msg.InputAnswer,),
        "Answer a task's waiting input step (its step event has status waiting_input and a "
        "prompt), from the tenant's own account (its credentials decide the tenant, so only "
        "its own tasks can be answered). It arrives in Baton's account as "
        f"baton.input.<tenant>.<task_id>, on stream {streams.TASKS_PREFIX}<tenant>. The first "
        "answer to a step wins; later ones, answers to a finished task and answers when no "
        "input waits are ignored. Header Nats-Msg-Id, if set, must not be the task id "
        "(use <task_id>.<step>.input). POST /v1/tasks/{task_id}/input publishes here too.",
        True,
    ),
    "tenantDocuments": (
        f"{subjects.DOCUMENTS}.{{doc_id}}", ("doc_id",), (msg.DocumentPut,),
        "Upload a document for the tenant's `search` tool, from the tenant's own account: it "
        f"arrives as baton.docs.<tenant>.<doc_id> on stream {streams.DOCUMENTS.name} (the "
        "tenant token set by the server); the body's tenant must be the publisher's. A later "
        "upload of an id replaces it. The stream is shared: publish without Nats-Msg-Id.", True,
    ),
    "events": (
        f"{subjects.EVENTS}.{{tenant}}.{{task_id}}", ("tenant", "task_id"),
        (msg.Accepted, msg.Step, msg.Completed, msg.Failed),
        f"A task's events, replayable from stream {streams.EVENTS.name}.", True,
    ),
    "tokens": (
        f"{subjects.TOKENS}.{{tenant}}.{{task_id}}", ("tenant", "task_id"), (msg.TokenDelta,),
        "A task's token deltas while its steps generate (batched by time: every 30-250 ms, "
        "longer while a worker streams more tasks), "
        f"replayable from stream {streams.TOKENS.name}: resume after the stream sequence of "
        "the last delta received. Deltas of a step's last attempt concatenate to its answer.",
        True,
    ),
    "jobs": (
        f"{subjects.JOBS}.{{pool}}", ("pool",), (msg.InferenceJob,),
        f"Inference jobs for a model pool (stream {streams.JOBS.name}, work queue).", False,
    ),
    "workerJobs": (
        f"{subjects.JOBS}.{{pool}}.{{worker}}", ("pool", "worker"), (msg.InferenceJob,),
        "A job routed to the worker whose prefix cache holds its session; rescued by the "
        "worker's peers if it dies.", False,
    ),
    "results": (
        f"{subjects.RESULTS}.{{tenant}}.{{task_id}}", ("tenant", "task_id"),
        (msg.InferenceResult,),
        f"Finished inference jobs (stream {streams.RESULTS.name}, work queue).", False,
    ),
    **{
        f"context{e.op.capitalize()}": (
            f"{subjects.CONTEXT_API}.{e.op}.{{tenant}}", ("tenant",), (e.request, e.reply),
            e.summary, False,
        )
        for e in context_api.ENDPOINTS.values()
    },
    "contextInvalidate": (
        f"{subjects.CONTEXT_INVALIDATE}.{{tenant}}", ("tenant",), (msg.ContextInvalidate,),
        "Core NATS broadcast: every context store replica drops cached sessions.", False,
    ),
    "contextAttachments": (
        f"{subjects.CONTEXT_ATTACHMENTS}.{{tenant}}.{{session}}.{{name}}",
        ("tenant", "session", "name"), (),
        f"Where attachments are stored (stream {streams.CONTEXT_ATTACHMENTS.name}); the body "
        "is the raw bytes, header Content-Type the media type.", False,
    ),
    "contextLog": (
        f"{subjects.CONTEXT_LOG}.{{tenant}}.{{session}}", ("tenant", "session"),
        (msg.StoredAppend,),
        f"Where histories are stored (stream {streams.CONTEXT.name}).", False,
    ),
    "contextLogInRegion": (
        f"{streams.regional_root('{region}', subjects.CONTEXT_LOG)}.{{tenant}}.{{session}}",
        ("region", "tenant", "session"), (msg.StoredAppend,),
        f"Where the histories of a region's tenants are stored (stream "
        f"{streams.CONTEXT_IN}<region>, on the servers tagged region:<region>).", False,
    ),
    "contextAttachmentsInRegion": (
        f"{streams.regional_root('{region}', subjects.CONTEXT_ATTACHMENTS)}"
        ".{tenant}.{session}.{name}", ("region", "tenant", "session", "name"), (),
        f"Where the attachments of a region's tenants are stored (stream "
        f"{streams.CONTEXT_ATTACHMENTS_IN}<region>, on the servers tagged region:<region>).",
        False,
    ),
    "heartbeats": (
        f"{subjects.HEARTBEATS}.{{pool}}.{{worker}}", ("pool", "worker"), (msg.Heartbeat,),
        "Core NATS: worker load and warm sessions, every few seconds.", False,
    ),
    "orchestratorLoad": (
        f"{subjects.ORCHESTRATOR_LOAD}.{{replica}}", ("replica",), (msg.ReplicaLoad,),
        "Core NATS: the tokens an orchestrator replica's runs hold, every "
        "BATON_REPLICA_LOAD_EVERY seconds; the other replicas lend idle token shares only out "
        "of what is left of the pools.", False,
    ),
    "cancel": (
        f"{subjects.CANCEL}.{{tenant}}.{{task_id}}", ("tenant", "task_id"), (msg.Cancel,),
        "Core NATS: abort a task's in-flight generations.", False,
    ),
    "timers": (
        f"{subjects.TIMERS}.{{tenant}}.{{task_id}}", ("tenant", "task_id"), (msg.RunTimer,),
        f"Durable run watchdogs (stream {streams.TIMERS.name}), naked until due.", False,
    ),
    "tools": (
        f"{subjects.TOOLS}.{{pool}}", ("pool",), (msg.ToolJob,),
        f"Tool calls for a tool pool (stream {streams.TOOLS.name}, work queue). Header "
        "Nats-Msg-Id: <tenant>.<task_id>.<step>.<call>; the result is appended to the session "
        "as a `tool` message under <call_id>:out, so a redelivered call is not run again.", False,
    ),
    "toolResults": (
        f"{subjects.TOOL_RESULTS}.{{tenant}}.{{task_id}}", ("tenant", "task_id"),
        (msg.ToolResult,),
        f"Finished tool calls (stream {streams.TOOL_RESULTS.name}, work queue): a preview "
        "and a ref, never the whole result.", False,
    ),
    "documents": (
        f"{subjects.DOCUMENTS}.{{tenant}}.{{doc_id}}", ("tenant", "doc_id"), (msg.DocumentPut,),
        f"Documents the `search` tool indexes for a tenant (stream {streams.DOCUMENTS.name}); "
        "a tenant publishes baton.docs.<doc_id> in its own account (the server maps it here "
        "with the publisher's tenant; a body naming another tenant is not indexed); "
        "POST /v1/documents publishes here.", False,
    ),
    "documentsErased": (
        f"{subjects.DOCUMENTS_ERASED}.{{tenant}}", ("tenant",), (msg.DocumentsErased,),
        "Core NATS broadcast after a tenant's erasure: every tool worker drops the tenant's "
        "documents from its search index.", False,
    ),
    "toolCatalog": (
        streams.TOOL_CATALOG.subject("{pool}"), ("pool",), (msg.ToolCatalog,),
        f"KV bucket {streams.TOOL_CATALOG.name}: the tools (with their JSON schemas) each "
        "tool pool serves, written by its workers at start.", False,
    ),
    "deadLetters": (
        f"{subjects.DEAD_LETTERS}.{{consumer}}", ("consumer",), (),
        f"Copies of terminated messages (stream {streams.DEAD_LETTERS.name}); the body is "
        "the original message, headers name the reason and the original subject.", False,
    ),
    "erased": (
        f"{subjects.ERASED}.{{tenant}}", ("tenant",), (msg.SessionsErased,),
        f"Sessions the context store erased (stream {streams.ERASURES.name}); the "
        "orchestrator erases the tasks that ran on them.", False,
    ),
    "audit": (
        f"{subjects.AUDIT}.{{action}}.{{tenant}}", ("action", "tenant"), (msg.AuditRecord,),
        f"The audit trail (stream {streams.AUDIT.name}, 400 days, no deletes): who did "
        "what to which target, when, and the outcome.", False,
    ),
}  # fmt: skip


def _all_types() -> list[Any]:
    seen: list[Any] = []
    for _, _, types, _, _ in _CHANNELS.values():
        seen.extend(t for t in types if t not in seen)
    return seen


def build() -> dict[str, Any]:
    """The AsyncAPI document as plain data."""
    _, schemas = msgspec.json.schema_components(
        _all_types(), ref_template="#/components/schemas/{name}"
    )
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    component_messages: dict[str, Any] = {}
    for name, (address, params, types, description, public) in _CHANNELS.items():
        refs = {}
        for t in types:
            component_messages[t.__name__] = {
                "name": t.__name__,
                "contentType": "application/msgpack",
                "payload": {"$ref": f"#/components/schemas/{t.__name__}"},
            }
            refs[t.__name__] = {"$ref": f"#/components/messages/{t.__name__}"}
        channels[name] = {
            "address": address,
            "description": description + ("" if public else " Internal: may change."),
            "parameters": {p: {"description": f"[A-Za-z0-9_-]{{1,64}} {p}"} for p in params},
            "messages": refs,
        }
        operations[f"on_{name}"] = {
            "action": "send" if name in ("tasks", "input", "tenantDocuments") else "receive",
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{m}"} for m in refs],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Baton",
            "version": "1.0.0",
            "description": "Message-driven runtime for multi-agent LLM systems. Every body "
            "is a MessagePack map with string keys (ContextRef is a 4-item array). Ids "
            f"that become subject tokens match {ID_PATTERN}.",
        },
        "defaultContentType": "application/msgpack",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": component_messages,
            "schemas": {"Id": _ID, **schemas},
        },
    }


def render() -> str:
    return yaml.safe_dump(build(), sort_keys=False, width=100, allow_unicode=True)
