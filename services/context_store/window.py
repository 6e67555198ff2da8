"""Token-budgeted windows.

``newest``: the leading system prompt, then the newest turns that fit, with a
marker saying how many older ones were dropped. ``summary_tail``: as
``newest``, but a stored summary of the first ``covers`` messages is pinned
after the system prompt and stands in for them.

Deterministic: the same history, summary and budget give the same window,
byte for byte, so an engine's prefix cache hits on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proto.messages import ChatMessage, Summary

Count = Callable[[ChatMessage], int]


class BudgetTooSmall(Exception):
    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"the window needs at least {needed} tokens, the budget is {budget}")
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True, slots=True)
class Window:
    messages: list[ChatMessage]
    tokens: int
    dropped: int
    summarized: int = 0


def omitted_marker(dropped: int) -> ChatMessage:
    return ChatMessage(role="system", content=f"[{dropped} earlier messages omitted]")


def summary_message(summary: Summary, replaced: int) -> ChatMessage:
    return ChatMessage(
        role="system", content=f"[summary of {replaced} earlier messages]\n{summary.content}"
    )


def build_window(
    messages: list[ChatMessage],
    tokens: list[int],
    budget: int,
    count: Count,
    summary: Summary | None = None,
) -> Window:
    """Pack ``messages`` (whose counts are ``tokens``) into ``budget`` tokens.

    The system prompt and the newest message are always kept. A summary is
    used only when it covers messages past the system prompt and fits beside
    the newest message; otherwise the window falls back to ``newest``.

    Raises:
        BudgetTooSmall: the system prompt and the newest message alone exceed it.
    """
    start = 1 if messages and messages[0].role == "system" else 0
    head, used = messages[:start], sum(tokens[:start])
    newest = tokens[-1] if len(messages) > start else 0
    if used + newest > budget:
        raise BudgetTooSmall(used + newest, budget)
    pinned: list[ChatMessage] = []
    body_from = start
    if summary is not None and start < summary.covers <= len(messages):
        note = summary_message(summary, summary.covers - start)
        cost = count(note)
        tail_newest = newest if summary.covers < len(messages) else 0
        if used + cost + tail_newest <= budget:
            pinned, body_from, used = [note], summary.covers, used + cost
    left = budget - used
    kept: list[int] = []  # newest first
    for i in range(len(messages) - 1, body_from - 1, -1):
        if tokens[i] > left:
            break
        kept.append(i)
        left -= tokens[i]
    dropped = (len(messages) - body_from) - len(kept)
    marker: list[ChatMessage] = []
    while dropped:
        m = omitted_marker(dropped)
        cost = count(m)
        if cost <= left:
            marker, left = [m], left - cost
            break
        if len(kept) <= 1:
            break  # no room for the marker; the newest message matters more
        left += tokens[kept.pop()]
        dropped += 1
    chosen = [messages[i] for i in reversed(kept)]
    summarized = (body_from - start) if pinned else 0
    return Window(head + pinned + marker + chosen, budget - left, dropped, summarized)
