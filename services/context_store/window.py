"""Token-budgeted windows: the system prompt plus the newest turns that fit."""

from __future__ import annotations

from dataclasses import dataclass

from proto.messages import ChatMessage

from .history import estimate_tokens


class BudgetTooSmall(Exception):
    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"the window needs at least {needed} tokens, the budget is {budget}")


@dataclass(frozen=True, slots=True)
class Window:
    messages: list[ChatMessage]
    tokens: int
    dropped: int


def omitted_marker(dropped: int) -> ChatMessage:
    return ChatMessage(role="system", content=f"[{dropped} earlier messages omitted]")


def build_window(messages: list[ChatMessage], tokens: list[int], budget: int) -> Window:
    """Newest-first packing under ``budget`` tokens.

    The leading system message is always kept, and so is the newest message;
    when older turns are dropped a marker says how many. Deterministic: the
    same history and budget give the same window, byte for byte.

    Raises:
        BudgetTooSmall: the system prompt and the newest message alone exceed it.
    """
    start = 1 if messages and messages[0].role == "system" else 0
    head, head_tokens = messages[:start], sum(tokens[:start])
    body = range(len(messages) - 1, start - 1, -1)
    left = budget - head_tokens
    kept: list[int] = []
    for i in body:
        if tokens[i] > left:
            break
        kept.append(i)
        left -= tokens[i]
    if len(messages) > start and not kept:
        raise BudgetTooSmall(head_tokens + tokens[-1], budget)
    if head_tokens > budget:
        raise BudgetTooSmall(head_tokens, budget)
    dropped = (len(messages) - start) - len(kept)
    marker: list[ChatMessage] = []
    if dropped:
        m = omitted_marker(dropped)
        cost = estimate_tokens(m)
        while kept and cost > left and len(kept) > 1:
            left += tokens[kept.pop()]
            dropped += 1
            m = omitted_marker(dropped)
        if cost <= left:
            marker = [m]
            left -= cost
    chosen = [messages[i] for i in reversed(kept)]
    return Window(head + marker + chosen, budget - left, dropped)
