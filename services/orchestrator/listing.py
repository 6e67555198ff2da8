"""``GET /v1/tasks``: filter and page a tenant's runs. Pure.

Newest first (``created_at`` descending, then ``task_id``); the cursor is the
position of the last run of a page, so a page stays stable while new tasks
arrive (they sort before it).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass

from .state import RunState

MAX_PAGE = 200


class BadCursor(ValueError):
    """The cursor was not made by ``encode_cursor``."""


def encode_cursor(run: RunState) -> str:
    raw = json.dumps([run.created_at, run.task_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, task_id = json.loads(raw)
        return float(created), str(task_id)
    except (ValueError, TypeError) as exc:
        raise BadCursor(f"invalid cursor {cursor!r}") from exc


@dataclass(frozen=True, slots=True)
class Page:
    runs: list[RunState]
    next_cursor: str | None


def page_runs(
    runs: Iterable[RunState],
    *,
    status: str | None = None,
    workflow: str | None = None,
    since: float | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """The runs matching every filter given, one page of at most ``limit``.

    Raises:
        BadCursor: ``cursor`` is not one this function returned.
    """
    after = decode_cursor(cursor) if cursor else None
    chosen = [
        r
        for r in runs
        if (status is None or r.status == status)
        and (workflow is None or r.workflow == workflow)
        and (since is None or r.created_at >= since)
    ]
    chosen.sort(key=lambda r: (-r.created_at, r.task_id))
    if after is not None:
        key = (-after[0], after[1])
        chosen = [r for r in chosen if (-r.created_at, r.task_id) > key]
    limit = max(1, min(limit, MAX_PAGE))
    page = chosen[:limit]
    more = len(chosen) > limit
    return Page(page, encode_cursor(page[-1]) if more and page else None)
