"""The tasks a worker has heard cancelled (core ``baton.cancel.<tenant>.<task_id>``),
so a job of one that is still queued is skipped: the latest ``REMEMBER`` of
them, the oldest forgotten first (a cancel is heard once, its jobs arrive soon)."""

from __future__ import annotations

from collections import OrderedDict

REMEMBER = 4096


class CancelledTasks:
    """A bounded set of ``(tenant, task_id)``."""

    def __init__(self, remember: int = REMEMBER) -> None:
        self.remember = remember
        self._tasks: OrderedDict[tuple[str, str], None] = OrderedDict()

    def add(self, tenant: str, task_id: str) -> None:
        self._tasks[(tenant, task_id)] = None
        while len(self._tasks) > self.remember:
            self._tasks.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)
