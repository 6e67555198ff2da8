"""Any OpenAI-compatible chat server over HTTP (vLLM's own server included).

``base_url`` is the server root (``http://host:port``; a trailing ``/v1`` is
accepted and stripped). Generation streams server-sent events from
``/v1/chat/completions`` with ``stream_options.include_usage`` so the last
event carries token counts; ``usage.prompt_tokens_details.cached_tokens`` (vLLM
sends it with ``--enable-prompt-tokens-details``) becomes ``cached_tokens``.

What an HTTP server does not tell us reliably comes from the constructor:
``capacity`` is configured, not discovered. ``stats`` reads vLLM's Prometheus
``/metrics`` in a background task (every ``stats_interval`` seconds); against
servers without it the counters stay at zero and ``extra["metrics_ok"]`` is 0.

Token counting: the interface's ``count_prompt_tokens`` is synchronous, and a
blocking HTTP call on the event loop is not acceptable, so it *estimates* from
the characters of the messages and of the offered tools' JSON (the server's
template renders them into the prompt), with a tokens-per-character ratio calibrated by
the ``usage.prompt_tokens`` of every finished request (and by every exact
count). ``count_prompt_tokens_async`` asks the server's ``/tokenize`` (vLLM
has it) for the exact figure and falls back to the estimate.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from proto.messages import ChatMessage, ToolCall, ToolSpec
from proto.tools import INVALID_CALL, openai_tools
from services.inference_worker.engines.base import (
    EngineCapacity,
    EngineDead,
    EngineError,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
    openai_message,
)
from services.inference_worker.engines.toolcalls import call_id, tools_in_use, tools_json

# Per-message overhead of a chat template (role markers, separators), in tokens.
_MESSAGE_OVERHEAD_TOKENS = 4
_CONTEXT_ERROR = re.compile(r"context length|maximum model length|too long", re.IGNORECASE)
# vLLM 0.32: "... your prompt contains at least 2049 input tokens ..." or
# "Input length (2100) exceeds ..."; older: "(2100 in the messages, ...)".
_PROMPT_TOKENS_IN_ERROR = re.compile(
    r"(\d+) input tokens|Input length \((\d+)\)|(\d+) (?:tokens )?in the messages"
)

_METRIC_SAMPLES = {
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
}

# Sentinel that ends the producer -> consumer queue of one generation.
_END = object()


def _merge_tool_deltas(acc: dict[int, dict[str, str]], deltas: list[dict[str, Any]]) -> None:
    """Streamed ``delta.tool_calls`` arrive in pieces (id and name first, then
    the arguments a fragment at a time), keyed by ``index``."""
    for d in deltas:
        slot = acc.setdefault(int(d.get("index", 0)), {"id": "", "name": "", "arguments": ""})
        slot["id"] = d.get("id") or slot["id"]
        fn = d.get("function") or {}
        slot["name"] = fn.get("name") or slot["name"]
        slot["arguments"] += fn.get("arguments") or ""


def _chars(messages: list[ChatMessage], tools: Sequence[ToolSpec]) -> int:
    return sum(len(m.content) for m in messages) + len(tools_json(tools))


def parse_vllm_metrics(text: str) -> EngineStats:
    """Read the ``vllm:*`` samples Baton uses from Prometheus exposition text,
    summed over label sets (several engines behind one server add up; the
    KV-cache usage gauge is averaged)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = _METRIC_SAMPLES.get(sample.name)
            if field is not None:
                sums[field] = sums.get(field, 0.0) + float(sample.value)
                counts[field] = counts.get(field, 0) + 1
    kv = sums.get("kv_usage", 0.0) / max(counts.get("kv_usage", 1), 1)
    return EngineStats(
        kv_usage=kv,
        prefix_cache_queries=int(sums.get("prefix_cache_queries", 0)),
        prefix_cache_hits=int(sums.get("prefix_cache_hits", 0)),
        preemptions=int(sums.get("preemptions", 0)),
        running=int(sums.get("running", 0)),
        waiting=int(sums.get("waiting", 0)),
    )


class OpenAIEngine:
    """An OpenAI-compatible HTTP server behind the ``Engine`` protocol.

    Errors: connection failures, timeouts and HTTP 5xx raise ``EngineDead``; an
    HTTP 400 about the context length raises ``PromptTooLong``; other 4xx raise
    ``EngineError``. ``abort`` cancels the streaming HTTP request (vLLM aborts
    a request whose client disconnects); the generation then ends with
    ``finish_reason="abort"`` and ``completion_tokens`` approximated by the
    number of non-empty streamed deltas (about one per token on vLLM), since no
    usage event arrives. The same fallback (and the prompt estimate) applies to
    servers that ignore ``stream_options``.

    ``max_tokens`` beyond the context is not refused by vLLM 0.32's server (it
    stops at the context instead), so ``PromptTooLong`` here means the prompt
    alone does not fit.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        kv_tokens: int = 65536,
        max_num_seqs: int = 64,
        max_model_len: int = 2048,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        stats_interval: float = 2.0,
    ) -> None:
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.model = model
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.stats_interval = stats_interval
        self._capacity = EngineCapacity(
            kv_tokens=kv_tokens, max_num_seqs=max_num_seqs, max_model_len=max_model_len
        )
        self._client: httpx.AsyncClient | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stats = EngineStats()
        self._stats_task: asyncio.Task[None] | None = None
        self._stats_at = 0.0
        self._tokens_per_char = 0.25
        self._tokenize_ok = True

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Open the HTTP client and check the server answers ``/health``
        (``EngineDead`` if not). Starts the metrics scraper."""
        if self._client is not None:
            return
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.read_timeout, connect=self.connect_timeout)
        # Enough connections for every sequence slot to stream at once.
        limits = httpx.Limits(max_connections=self._capacity.max_num_seqs + 16)
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout, limits=limits
        )
        if not await self.healthy():
            await self.stop()
            raise EngineDead(f"no healthy OpenAI-compatible server at {self.base_url}")
        await self.refresh_stats()
        self._stats_task = asyncio.create_task(self._scrape_loop(), name="openai-engine-metrics")

    async def stop(self) -> None:
        """Cancel in-flight generations and the scraper, close the client
        (idempotent)."""
        tasks = [*self._tasks.values(), *([self._stats_task] if self._stats_task else [])]
        self._stats_task = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineDead("engine not started")
        return self._client

    # ------------------------------------------------------------ interface

    def capacity(self) -> EngineCapacity:
        """As configured in the constructor (HTTP servers don't expose it)."""
        return self._capacity

    def count_prompt_tokens(
        self, messages: list[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> int:
        """An estimate: characters (of the messages and of the tools' JSON)
        x calibrated tokens-per-character, plus a few tokens of template per
        message. See ``count_prompt_tokens_async`` for the exact count."""
        chars = _chars(messages, tools)
        return int(chars * self._tokens_per_char) + _MESSAGE_OVERHEAD_TOKENS * len(messages)

    async def count_prompt_tokens_async(
        self, messages: list[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> int:
        """The server's exact count via ``/tokenize`` (chat form, with the
        generation prompt and the tools: vLLM's chat tokenize request takes
        ``tools`` and renders them), or the estimate if the server has no
        such endpoint."""
        if self._tokenize_ok:
            body: dict[str, Any] = {
                "model": self.model,
                "messages": [openai_message(m) for m in messages],
                "add_generation_prompt": True,
            }
            if tools:
                body["tools"] = openai_tools(list(tools))
            try:
                resp = await self._http().post("/tokenize", json=body)
            except httpx.HTTPError as exc:
                raise EngineDead(f"tokenize failed: {exc!r}") from exc
            if resp.status_code == 200:
                count = int(resp.json()["count"])
                self._calibrate(messages, tools, count)
                return count
            if resp.status_code in (404, 405):
                self._tokenize_ok = False
            else:
                self._raise_for(resp.status_code, resp.text, messages, tools)
        return self.count_prompt_tokens(messages, tools)

    def _calibrate(
        self, messages: list[ChatMessage], tools: Sequence[ToolSpec], prompt_tokens: int
    ) -> None:
        chars = _chars(messages, tools)
        if chars < 64:
            return
        ratio = max(prompt_tokens - _MESSAGE_OVERHEAD_TOKENS * len(messages), 0) / chars
        self._tokens_per_char = 0.8 * self._tokens_per_char + 0.2 * ratio

    def _raise_for(
        self, status: int, text: str, messages: list[ChatMessage], tools: Sequence[ToolSpec]
    ) -> None:
        """Map an HTTP error status to the engine error tree."""
        if status >= 500:
            raise EngineDead(f"server error {status}: {text[:300]}")
        if status == 400 and _CONTEXT_ERROR.search(text):
            match = _PROMPT_TOKENS_IN_ERROR.search(text)
            if match:
                prompt_tokens = int(next(g for g in match.groups() if g))
            else:
                prompt_tokens = self.count_prompt_tokens(messages, tools)
            raise PromptTooLong(prompt_tokens, self._capacity.max_model_len)
        raise EngineError(f"request rejected ({status}): {text[:300]}")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream text deltas; the final chunk carries the server's usage.

        ``finish_reason`` is the server's (``"stop"``, ``"length"``) or
        ``"abort"`` after ``abort``. The HTTP stream runs in its own task so
        ``abort`` can cancel it from anywhere."""
        client = self._http()
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [openai_message(m) for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.seed is not None:
            body["seed"] = request.seed
        tools = tools_in_use(request.tools, request.tool_choice)
        if tools:  # passed through as they are
            body["tools"] = openai_tools(list(tools))
            body["tool_choice"] = request.tool_choice
        elif request.json_schema is not None:  # the OpenAI way to ask for guided JSON
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": json.loads(request.json_schema)},
            }
        if request.request_id in self._tasks:
            raise EngineError(f"request id {request.request_id} already in flight")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.create_task(self._stream(client, body, request, queue))
        # Ends the queue however the producer ends, even if cancelled unstarted.
        task.add_done_callback(lambda _: queue.put_nowait(_END))
        self._tasks[request.request_id] = task

        text_events = 0
        calls: dict[int, dict[str, str]] = {}
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item.get("usage"):
                    usage = item["usage"]
                for choice in item.get("choices") or []:
                    _merge_tool_deltas(calls, (choice.get("delta") or {}).get("tool_calls") or [])
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                    if delta:
                        text_events += 1
                        yield GenerationChunk(text=delta)
            if task.cancelled():
                finish_reason = "abort"
        finally:
            self._tasks.pop(request.request_id, None)
            if not task.done():
                task.cancel()
                await asyncio.wait([task])

        prompt_tokens = completion_tokens = cached_tokens = 0
        if usage is not None:
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            cached_tokens = int(details.get("cached_tokens") or 0)
            self._calibrate(request.messages, tools, prompt_tokens)
        else:
            prompt_tokens = self.count_prompt_tokens(request.messages, tools)
            completion_tokens = text_events
        yield GenerationChunk(
            text="",
            finished=True,
            finish_reason=finish_reason or "abort",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            tool_calls=[
                ToolCall(id=c["id"] or call_id(i), name=c["name"] or INVALID_CALL,
                         arguments=c["arguments"] or "{}")
                for i, c in sorted(calls.items())
            ] or None,
        )  # fmt: skip

    async def _stream(
        self,
        client: httpx.AsyncClient,
        body: dict[str, Any],
        request: GenerationRequest,
        queue: asyncio.Queue[Any],
    ) -> None:
        """Producer: put each decoded SSE event on ``queue``; errors go on it as
        ``EngineError``s. Cancellation (abort) closes the HTTP stream. The
        task's done callback ends the queue."""
        tools = tools_in_use(request.tools, request.tool_choice)
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    self._raise_for(resp.status_code, text, request.messages, tools)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        err = event["error"] or {}
                        code = err.get("code")
                        status = code if isinstance(code, int) else 500
                        self._raise_for(
                            status, str(err.get("message", err)), request.messages, tools
                        )
                    queue.put_nowait(event)
        except EngineError as exc:
            queue.put_nowait(exc)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            queue.put_nowait(EngineDead(f"{type(exc).__name__}: {exc}"))
        except (httpx.HTTPError, ValueError) as exc:
            queue.put_nowait(EngineError(f"{type(exc).__name__}: {exc}"))

    async def abort(self, request_id: str) -> None:
        """Cancel the streaming request; no error if it already ended."""
        task = self._tasks.get(request_id)
        if task is not None and not task.done():
            task.cancel()

    async def healthy(self) -> bool:
        """``GET /health`` answers 200."""
        if self._client is None:
            return False
        try:
            resp = await self._client.get("/health", timeout=self.connect_timeout)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    def stats(self) -> EngineStats:
        """The latest scrape of ``/metrics`` (at most ``stats_interval`` old).
        ``extra``: ``metrics_ok`` (1/0) and ``metrics_age_s``."""
        s = self._stats
        return EngineStats(
            kv_usage=s.kv_usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            preemptions=s.preemptions,
            running=s.running,
            waiting=s.waiting,
            extra={**s.extra, "metrics_age_s": time.monotonic() - self._stats_at},
        )

    async def refresh_stats(self) -> EngineStats:
        """Scrape ``/metrics`` now. Failures keep the previous counters and set
        ``metrics_ok`` to 0."""
        try:
            resp = await self._http().get("/metrics", timeout=self.connect_timeout)
            resp.raise_for_status()
            stats = parse_vllm_metrics(resp.text)
            stats.extra["metrics_ok"] = 1.0
        except (httpx.HTTPError, ValueError, EngineError):
            stats = self._stats
            stats.extra["metrics_ok"] = 0.0
        self._stats = stats
        self._stats_at = time.monotonic()
        return self.stats()

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            await self.refresh_stats()
