"""``baton submit``: publish one task over NATS and show it as it runs.

Only core subscriptions on the task's public subjects (events and token
deltas) plus a JetStream publish of the task, so it works with a tenant's
own credentials. On a terminal, live regions: one line per step, a running
agent's showing the newest text it generated (parallel agents on lines of
their own, never interleaved), and each step's whole text printed above them
when it ends. Otherwise (a pipe) each step's text goes to stdout under a
``[step agent]`` header, one step at a time (a parallel branch's is held
until the step before it ended) and progress to stderr; ``--json`` writes
one JSON object per event or delta (NDJSON), the terminal event last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import msgspec

from baton.bus import Bus, Subscription
from proto import codec, subjects
from proto.messages import Accepted, Completed, Failed, Step, TaskEvent, TokenDelta

EXIT_COMPLETED, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 4


@dataclass
class _StepView:
    agent: str
    status: str = "started"
    text: str = ""
    attempt: str = ""
    usage: str = ""
    shown: bool = False  # its whole text was printed above the live regions
    closed: bool = False  # its last delta was an attempt's final one (a model turn ended)


@dataclass
class TaskView:
    """What the display shows; fed events and deltas in arrival order."""

    task_id: str
    workflow: str
    steps: dict[str, _StepView] = field(default_factory=dict)
    end: Completed | Failed | None = None

    def on_event(self, ev: TaskEvent) -> None:
        if isinstance(ev, Step):
            if ev.call is not None:  # a tool call of the step: the step goes on
                return
            view = self.steps.setdefault(ev.step, _StepView(ev.agent))
            view.status = ev.status
            if ev.usage is not None:
                view.usage = f"{ev.usage.prompt_tokens}+{ev.usage.completion_tokens} tokens"
        elif isinstance(ev, Completed | Failed):
            self.end = ev

    def on_delta(self, d: TokenDelta) -> str:
        """Record a delta; returns the text to append to this step's output
        (an attempt that starts over clears what the earlier one sent)."""
        view = self.steps.setdefault(d.step, _StepView(d.agent))
        if d.attempt != view.attempt:
            view.attempt, view.text = d.attempt, ""
        view.text += d.text
        view.closed = d.final
        return d.text

    def finished(self) -> list[tuple[str, _StepView]]:
        """Steps that ended with text not printed yet (each is printed once,
        whole, above the live regions)."""
        out = []
        for step_id, v in self.steps.items():
            ended = v.status in ("done", "failed") or self.end is not None
            if ended and v.text and not v.shown:
                v.shown = True
                out.append((step_id, v))
        return out

    def render(self, width: int = 100) -> Any:
        """The live regions: one line per step — a running agent's line shows
        the newest text it generated, so parallel agents stream side by
        side, each on its own line, never interleaved."""
        from rich.console import Group
        from rich.text import Text

        icon = {"started": ("⋯", "yellow"), "done": ("✓", "green"), "failed": ("✗", "red"),
                "waiting_input": ("?", "cyan")}  # fmt: skip
        lines: list[Any] = [
            Text.assemble((f"{self.workflow} ", "bold"), "task ", (self.task_id, "cyan"))
        ]
        for step_id, v in self.steps.items():
            status = v.status
            if isinstance(self.end, Failed) and status == "started":
                status = "failed"
            mark, style = icon.get(status, ("?", ""))
            head = Text.assemble((f"{mark} ", style), (f"{step_id} ", "bold"), (v.agent, "dim"))
            if status == "started" and v.text:
                room = max(10, width - head.cell_len - 3)
                tail = v.text.replace("\n", " ")[-room:]
                line = Text.assemble(head, (" │ ", "dim"), tail)
            else:
                line = Text.assemble(head, (f"  {v.usage}" if v.usage else "", "dim"))
            line.no_wrap, line.overflow = True, "ellipsis"
            lines.append(line)
        if isinstance(self.end, Completed):
            lines.append(Text(_summary(self.end), style="green"))
        elif isinstance(self.end, Failed):
            lines.append(Text(_summary(self.end), style="red"))
        return Group(*lines)


class PlainStreams:
    """Step texts on a pipe, never interleaved: one step streams at a time
    (``[step agent] text``); a step generating meanwhile (a parallel
    branch) is held and printed whole when its turn comes — at once if it
    has ended by then, else streaming on from what it had."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.current: str | None = None
        self.held: dict[str, list[str]] = {}  # step -> [agent, text so far]
        self.ended: set[str] = set()

    def delta(self, d: TokenDelta, again: bool) -> None:
        """One delta; ``again``: its step is being generated over (drop what
        the lost generation sent)."""
        self.ended.discard(d.step)
        if d.step == self.current:
            if again:
                self.out.write(f"\n[{d.step} {d.agent}] (generated again) ")
            self.out.write(d.text)
        elif self.current is None and d.step not in self.held and d.text:
            self._begin(d.step, d.agent)
            self.out.write(d.text)
        elif d.text or d.step in self.held:
            held = self.held.setdefault(d.step, [d.agent, ""])
            held[1] = d.text if again else held[1] + d.text
        self.out.flush()
        if d.final:
            self.end(d.step)

    def _begin(self, step: str, agent: str) -> None:
        self.current = step
        self.out.write(f"[{step} {agent}] ")

    def end(self, step: str) -> None:
        """``step``'s text is complete: end its line, let the next one speak."""
        self.ended.add(step)
        if step != self.current:
            return
        self.out.write("\n")
        self.current = None
        while self.held:
            nxt = next(iter(self.held))
            agent, text = self.held.pop(nxt)
            if not text and nxt in self.ended:
                continue  # a model turn that only called tools: nothing to show
            self._begin(nxt, agent)
            self.out.write(text)
            if nxt not in self.ended:
                break  # it streams on live
            self.out.write("\n")
            self.current = None
        self.out.flush()

    def close(self) -> None:
        """The task ended: whatever is still open or held is printed whole."""
        for step in [*([self.current] if self.current else []), *self.held]:
            self.end(step)
        if self.current is not None:  # the last one never sent a final delta
            self.out.write("\n")
            self.current = None
        self.out.flush()


async def _behind(
    bus: Bus, subs: list[Subscription], queue: asyncio.Queue[TaskEvent | TokenDelta]
) -> list[TaskEvent | TokenDelta]:
    """What was received before now but not yet handed over: a flush (a
    round trip) means every earlier message is parsed into its subscription's
    queue; then let the subscriptions' tasks pass them on (bounded)."""
    with contextlib.suppress(Exception):
        await bus.flush(timeout=2)
    for _ in range(1000):
        if not any(sub.queued for sub in subs):
            break
        await asyncio.sleep(0)
    late = []
    while not queue.empty():
        late.append(queue.get_nowait())
    return late


def _summary(end: Completed | Failed) -> str:
    if isinstance(end, Completed):
        u = end.usage
        cost = f"{u.gpu_seconds:.3f} GPU-s, ${end.cost_usd:.6f}"
        return f"completed: {u.prompt_tokens}+{u.completion_tokens} tokens, {cost}"
    return f"failed: {end.error.code} ({end.error.layer}): {end.error.message}"


async def submit(
    bus: Bus,
    workflow: str,
    body: dict[str, Any],
    *,
    mode: str = "auto",  # "live" | "plain" | "json" | "auto"
    timeout: float = 300.0,
) -> int:
    """Publish ``body`` on ``baton.tasks.<workflow>`` and follow the task.
    Returns 0 on ``completed``, 1 on ``failed``, 4 on timeout."""
    tenant, task_id = body["tenant"], body["task_id"]
    queue: asyncio.Queue[TaskEvent | TokenDelta] = asyncio.Queue()

    async def arrived(body: TaskEvent | TokenDelta, _: str) -> None:
        await queue.put(body)

    event_type: Any = TaskEvent  # a union of Structs: what the typed subscription decodes
    subs = [
        await bus.subscribe(subjects.event(tenant, task_id), event_type, arrived),
        await bus.subscribe(subjects.tokens(tenant, task_id), TokenDelta, arrived),
    ]
    await bus.flush()
    await bus.publish(subjects.task(workflow), codec.encode(body), msg_id=task_id)
    if mode == "auto":
        mode = "live" if sys.stdout.isatty() else "plain"
    view = TaskView(task_id, workflow)
    live = None
    plain = PlainStreams(sys.stdout) if mode == "plain" else None
    if mode == "live":
        from rich.live import Live

        live = Live(view.render(), refresh_per_second=12, transient=False)
        live.start()

    def show(item: TaskEvent | TokenDelta) -> None:
        if mode == "json":
            print(json.dumps(msgspec.to_builtins(item)), flush=True)
        if isinstance(item, TokenDelta):
            known = view.steps.get(item.step)
            # Another attempt after one that ended is the step's next model
            # turn (after tool calls); before it ended, a generation over.
            again = (
                known is not None and known.attempt not in ("", item.attempt) and not known.closed
            )
            view.on_delta(item)
            if plain is not None:
                plain.delta(item, again)
        else:
            view.on_event(item)
            if plain is not None:
                if (
                    isinstance(item, Step)
                    and item.call is None
                    and item.status in ("done", "failed")
                ):
                    plain.end(item.step)
                if isinstance(item, Completed | Failed):
                    plain.close()
            if mode == "plain" and isinstance(item, Accepted):
                print(f"accepted: task {task_id}, session {item.session}", file=sys.stderr)
        if live is not None:
            from rich.rule import Rule

            for step_id, v in view.finished():  # whole, above the live regions
                live.console.print(Rule(f"{step_id} {v.agent}", align="left", style="dim"))
                live.console.print(v.text, highlight=False, markup=False)
            live.update(view.render(live.console.width))

    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                silent = f"no terminal event within {timeout:.0f}s (task {task_id})"
                print(f"baton: {silent}", file=sys.stderr)
                return EXIT_TIMEOUT
            if isinstance(item, Completed | Failed):
                # A step's deltas reach the server before its events, but nats-py
                # runs each subscription's callbacks in a task of its own: the
                # terminal event can be handed over before deltas that were ahead
                # of it on the wire. Show those first.
                for late in await _behind(bus, subs, queue):
                    show(late)
            show(item)
            if view.end is not None:
                if mode == "plain":
                    print(_summary(view.end), file=sys.stderr)
                return EXIT_COMPLETED if isinstance(view.end, Completed) else EXIT_FAILED
    finally:
        if live is not None:
            live.stop()
        for sub in subs:
            await sub.unsubscribe()
