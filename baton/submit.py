"""``baton submit``: publish one task and print its events as they arrive."""

from __future__ import annotations

import asyncio
import json
import sys

import msgspec
import nats
from nats.aio.msg import Msg

from proto import codec, subjects
from proto.messages import Accepted, Completed, Failed, Step, TaskEvent


def _line(ev: TaskEvent) -> str:
    if isinstance(ev, Accepted):
        return f"accepted  task={ev.task_id} session={ev.session} workflow={ev.workflow}"
    if isinstance(ev, Step):
        extra = ""
        if ev.usage is not None:
            extra = f" tokens={ev.usage.prompt_tokens}+{ev.usage.completion_tokens}"
        return f"step      {ev.step} {ev.agent} {ev.status}{extra}"
    if isinstance(ev, Completed):
        usage = json.dumps(msgspec.to_builtins(ev.usage))
        return f"completed output={ev.output!r}\n          usage={usage} cost_usd={ev.cost_usd:.8f}"
    return f"failed    {ev.error.code} ({ev.error.layer}): {ev.error.message}"


async def submit(
    url: str,
    workflow: str,
    text: str,
    *,
    tenant: str,
    session: str | None,
    task_id: str,
    max_tokens: int | None = None,
    timeout: float = 300.0,
) -> int:
    """Returns 0 on ``completed``, 1 on ``failed``, 2 on timeout."""
    nc = await nats.connect(url, connect_timeout=3)
    try:
        js = nc.jetstream()
        events: asyncio.Queue[TaskEvent] = asyncio.Queue()

        async def on_event(msg: Msg) -> None:
            await events.put(codec.decode(msg.data, TaskEvent))  # type: ignore[arg-type]

        sub = await nc.subscribe(subjects.event(tenant, task_id), cb=on_event)
        body: dict[str, object] = {"tenant": tenant, "input": text, "task_id": task_id}
        if session:
            body["session"] = session
        if max_tokens:
            body["budget"] = {"max_tokens": max_tokens}
        await js.publish(
            subjects.task(workflow), codec.encode(body), headers={"Nats-Msg-Id": task_id}
        )
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout)
            except TimeoutError:
                print(f"no terminal event within {timeout}s", file=sys.stderr)
                return 2
            print(_line(ev), flush=True)
            if isinstance(ev, Completed | Failed):
                await sub.unsubscribe()
                return 0 if isinstance(ev, Completed) else 1
    finally:
        await nc.close()
