"""``baton submit``: publish one task over NATS and show it as it runs.

Only core subscriptions on the task's public subjects (events and token
deltas) plus a JetStream publish of the task, so it works with a tenant's
own credentials. On a terminal, a live step tree with each step's text as it
is generated; otherwise (a pipe) each step's text streams to stdout under a
``[step agent]`` header and progress goes to stderr; ``--json`` writes one
JSON object per event or delta (NDJSON), the terminal event last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import msgspec

from baton.transport import Bus, Msg
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


@dataclass
class TaskView:
    """What the display shows; fed events and deltas in arrival order."""

    task_id: str
    workflow: str
    steps: dict[str, _StepView] = field(default_factory=dict)
    end: Completed | Failed | None = None

    def on_event(self, ev: TaskEvent) -> None:
        if isinstance(ev, Step):
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
        return d.text

    def render(self) -> Any:
        from rich.console import Group
        from rich.text import Text
        from rich.tree import Tree

        icon = {"started": "[yellow]⋯[/]", "done": "[green]✓[/]", "failed": "[red]✗[/]"}
        tree = Tree(f"[bold]{self.workflow}[/] task [cyan]{self.task_id}[/]")
        for step_id, v in self.steps.items():
            status = (
                "failed" if isinstance(self.end, Failed) and v.status == "started" else v.status
            )
            node = tree.add(f"{icon.get(status, '?')} {step_id} [dim]{v.agent}[/] {v.usage}")
            if v.text:
                tail = v.text[-160:].replace("\n", " ")
                node.add(Text(("…" if len(v.text) > 160 else "") + tail, style="dim"))
        parts: list[Any] = [tree]
        if isinstance(self.end, Completed):
            parts.append(Text(self.end.output))
            parts.append(Text(_summary(self.end), style="green"))
        elif isinstance(self.end, Failed):
            parts.append(Text(_summary(self.end), style="red"))
        return Group(*parts)


async def _behind(
    bus: Bus, subs: list[Any], queue: asyncio.Queue[TaskEvent | TokenDelta]
) -> list[TaskEvent | TokenDelta]:
    """What was received before now but not yet handed over: a flush (a
    round trip) means every earlier message is parsed into its subscription's
    queue; then let the subscriptions' tasks pass them on (bounded)."""
    with contextlib.suppress(Exception):
        await bus.flush(timeout=2)
    for _ in range(1000):
        if not any(sub.pending_msgs for sub in subs):
            break
        await asyncio.sleep(0)
    late = []
    while not queue.empty():
        late.append(queue.get_nowait())
    return late


def _summary(end: Completed | Failed) -> str:
    if isinstance(end, Completed):
        u = end.usage
        return (f"completed: {u.prompt_tokens}+{u.completion_tokens} tokens, "
                f"{u.gpu_seconds:.3f} GPU-s, ${end.cost_usd:.6f}")  # fmt: skip
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

    async def on_event(msg: Msg) -> None:
        await queue.put(codec.decode(msg.data, TaskEvent))  # type: ignore[arg-type]

    async def on_token(msg: Msg) -> None:
        await queue.put(codec.decode(msg.data, TokenDelta))

    subs = [await bus.subscribe(subjects.event(tenant, task_id), on_event),
            await bus.subscribe(subjects.tokens(tenant, task_id), on_token)]  # fmt: skip
    await bus.flush()
    await bus.publish(subjects.task(workflow), codec.encode(body), msg_id=task_id)
    if mode == "auto":
        mode = "live" if sys.stdout.isatty() else "plain"
    view = TaskView(task_id, workflow)
    live = None
    if mode == "live":
        from rich.live import Live

        live = Live(view.render(), refresh_per_second=12, transient=False)
        live.start()
    current: str | None = None  # the step plain mode is printing

    def show(item: TaskEvent | TokenDelta) -> None:
        nonlocal current
        if mode == "json":
            print(json.dumps(msgspec.to_builtins(item)), flush=True)
        if isinstance(item, TokenDelta):
            known = view.steps.get(item.step)
            again = known is not None and known.attempt not in ("", item.attempt)
            text = view.on_delta(item)
            if mode == "plain" and text:
                if item.step != current or again:  # a regenerated step starts over
                    current = item.step
                    retry = " (generated again)" if again else ""
                    sys.stdout.write(f"\n[{item.step} {item.agent}]{retry} ")
                sys.stdout.write(text)
                sys.stdout.flush()
        else:
            view.on_event(item)
            if mode == "plain" and isinstance(item, Accepted):
                print(f"accepted: task {task_id}, session {item.session}", file=sys.stderr)
        if live is not None:
            live.update(view.render())

    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                print(f"baton: no terminal event within {timeout:.0f}s (task {task_id})",
                      file=sys.stderr)  # fmt: skip
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
                    if current is not None:
                        sys.stdout.write("\n")
                    print(_summary(view.end), file=sys.stderr)
                return EXIT_COMPLETED if isinstance(view.end, Completed) else EXIT_FAILED
    finally:
        if live is not None:
            live.stop()
        for sub in subs:
            await sub.unsubscribe()
