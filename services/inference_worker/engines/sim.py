"""The simulator engine: named as one, for laptops and fast tests.

It models what admission control cares about — prefill and decode time, a
KV-cache token budget it refuses to exceed (raising ``EngineOOM`` as a GPU would),
continuous batching (concurrent requests do not slow each other) — and emits
deterministic text, up to ``max_tokens`` (or about ``answer_tokens``, when
set: an agent that answers short). Fault injection: ``inject_oom(n)`` makes the next ``n``
generations fail with an OOM.

Tools: offered tools (``tool_choice`` not ``none``) that have no result in
the window yet (no ``tool`` message of that name) are each called once, in
the order offered, with arguments built from their schemas by
``proto.tools.example_arguments`` seeded with the newest user message; once
every offered tool has a result, the simulator answers in text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Sequence

from proto.messages import ChatMessage, ToolCall, ToolSpec
from proto.tools import example_arguments

from .base import (
    EngineCapacity,
    EngineDead,
    EngineOOM,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
)
from .toolcalls import call_id, tools_in_use, tools_json

_WORDS = [
    "baton",
    "signal",
    "relay",
    "context",
    "pointer",
    "stream",
    "batch",
    "token",
    "cache",
    "prefix",
    "worker",
    "agent",
    "plan",
    "check",
    "route",
    "merge",
    "answer",
    "draft",
    "verify",
    "fetch",
    "store",
    "window",
]


def render(messages: list[ChatMessage], tools: Sequence[ToolSpec] = ()) -> str:
    """The simulator's chat template (byte-stable). Offered tools come first,
    as their JSON, the way templates with tool support put them in the prompt."""
    head = f"<|tools|>{tools_json(tools)}\n" if tools else ""
    return head + "".join(f"<|{m.role}|>{m.content}\n" for m in messages) + "<|assistant|>"


class SimEngine:
    name = "sim"

    def __init__(
        self,
        *,
        kv_tokens: int = 65_536,
        max_num_seqs: int = 64,
        max_model_len: int = 2048,
        prefill_tps: float = 20_000.0,
        decode_tps: float = 400.0,
        load_s: float = 0.0,
        answer_tokens: int = 0,
        answer_spread: float = 0.0,
    ) -> None:
        self._capacity = EngineCapacity(kv_tokens, max_num_seqs, max_model_len)
        self.prefill_tps = prefill_tps
        self.decode_tps = decode_tps
        self.load_s = load_s  # what start() takes, as a model's load would
        # Answers end after about answer_tokens (0: they run to max_tokens),
        # within +-answer_spread of it, drawn from the prompt (deterministic).
        self.answer_tokens = answer_tokens
        self.answer_spread = answer_spread
        self._kv_used = 0
        self._running: dict[str, asyncio.Event] = {}
        self._oom_pending = 0
        self._alive = False
        self._stats = EngineStats()
        self._prefixes: set[bytes] = set()

    async def start(self) -> None:
        if self.load_s > 0:
            await asyncio.sleep(self.load_s)
        self._alive = True

    async def stop(self) -> None:
        self._alive = False
        for ev in self._running.values():
            ev.set()

    def capacity(self) -> EngineCapacity:
        return self._capacity

    def count_prompt_tokens(
        self, messages: list[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> int:
        return len(render(messages, tools).encode()) // 4 + 1

    def inject_oom(self, n: int = 1) -> None:
        self._oom_pending += n

    def _cached_prefix(self, messages: list[ChatMessage], tools: Sequence[ToolSpec]) -> int:
        """Tokens of the longest message-aligned prefix seen before."""
        hit = 0
        for i in range(len(messages), 0, -1):
            key = hashlib.sha256(render(messages[:i], tools).encode()).digest()
            if key in self._prefixes:
                hit = self.count_prompt_tokens(messages[:i], tools) - 1
                break
        for i in range(1, len(messages) + 1):
            self._prefixes.add(hashlib.sha256(render(messages[:i], tools).encode()).digest())
        return hit

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self._alive:
            raise EngineDead("simulator is stopped")
        tools = tools_in_use(request.tools, request.tool_choice)
        prompt = self.count_prompt_tokens(request.messages, tools)
        need = prompt + request.max_tokens
        if need > self._capacity.max_model_len:
            raise PromptTooLong(prompt, self._capacity.max_model_len)
        if self._oom_pending > 0:
            self._oom_pending -= 1
            raise EngineOOM("simulated out-of-memory (injected)")
        if self._kv_used + need > self._capacity.kv_tokens:
            raise EngineOOM(
                f"KV pool exhausted: {self._kv_used}+{need} > {self._capacity.kv_tokens}"
            )
        if len(self._running) >= self._capacity.max_num_seqs:
            raise EngineOOM("no free sequence slot")
        cached = self._cached_prefix(request.messages, tools)
        self._stats.prefix_cache_queries += prompt
        self._stats.prefix_cache_hits += cached
        aborted = asyncio.Event()
        self._running[request.request_id] = aborted
        self._kv_used += need
        seed = hashlib.sha256(render(request.messages).encode()).digest()
        calls = self._tool_calls(request.messages, tools)
        try:  # the reservation is released once, whichever answer is made
            await asyncio.sleep((prompt - cached) / self.prefill_tps)
            if calls:
                yield GenerationChunk(text="", finished=True, finish_reason="tool_calls",
                                      prompt_tokens=prompt, completion_tokens=8 * len(calls),
                                      cached_tokens=cached, tool_calls=calls)  # fmt: skip
                return
            if request.json_schema is not None:
                for chunk in self._json_answer(request, prompt, cached, seed):
                    yield chunk
                return
            produced = 0
            length = self._answer_length(seed, request.max_tokens)
            for i in range(length):
                if aborted.is_set():
                    break
                if not self._alive:
                    raise EngineDead("simulator stopped mid-generation")
                if self.decode_tps > 0:
                    await asyncio.sleep(1.0 / self.decode_tps)
                word = _WORDS[seed[i % len(seed)] % len(_WORDS)]
                if i == 0:  # says what it saw, so tests and demos can check the context
                    word = f"[sim: {len(request.messages)} messages, {prompt} tokens] {word}"
                produced += 1
                yield GenerationChunk(text=word if i == 0 else f" {word}")
            reason = "abort" if aborted.is_set() else "stop"
            if not aborted.is_set() and length == request.max_tokens:
                reason = "length"
            yield GenerationChunk(
                text="",
                finished=True,
                finish_reason=reason,
                prompt_tokens=prompt,
                completion_tokens=produced,
                cached_tokens=cached,
            )
        finally:
            self._kv_used -= need
            self._running.pop(request.request_id, None)

    def _answer_length(self, seed: bytes, max_tokens: int) -> int:
        if self.answer_tokens <= 0:
            return max_tokens
        u = int.from_bytes(seed[-4:], "big") / 0xFFFFFFFF  # uniform in [0, 1]
        n = round(self.answer_tokens * (1.0 + self.answer_spread * (2.0 * u - 1.0)))
        return max(1, min(max_tokens, n))

    @staticmethod
    def _tool_calls(messages: list[ChatMessage], tools: Sequence[ToolSpec]) -> list[ToolCall]:
        answered = {m.name for m in messages if m.role == "tool"}
        users = [m.content for m in messages if m.role == "user"]
        seed = users[-1][:200] if users else ""
        return [
            ToolCall(id=call_id(i), name=t.name,
                     arguments=json.dumps(example_arguments(json.loads(t.parameters), seed)))
            for i, t in enumerate(tools) if t.name not in answered
        ]  # fmt: skip

    @staticmethod
    def _json_answer(
        request: GenerationRequest, prompt: int, cached: int, seed: bytes
    ) -> list[GenerationChunk]:
        """Guided decoding, simulated: an object choosing one value (by the
        prompt's hash) of each enum property in the schema."""
        schema = json.loads(request.json_schema or "{}")
        answer = {
            name: prop["enum"][seed[i] % len(prop["enum"])]
            for i, (name, prop) in enumerate(schema.get("properties", {}).items())
            if prop.get("enum")
        }
        text = json.dumps(answer)
        return [
            GenerationChunk(text=text),
            GenerationChunk(text="", finished=True, finish_reason="stop",
                            prompt_tokens=prompt, completion_tokens=len(text) // 4 + 1,
                            cached_tokens=cached),
        ]  # fmt: skip

    async def abort(self, request_id: str) -> None:
        ev = self._running.get(request_id)
        if ev is not None:
            ev.set()

    async def healthy(self) -> bool:
        return self._alive

    def stats(self) -> EngineStats:
        self._stats.kv_usage = self._kv_used / self._capacity.kv_tokens
        self._stats.running = len(self._running)
        return self._stats
