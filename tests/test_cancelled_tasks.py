"""The workers' memory of cancelled tasks is bounded and forgets the oldest."""

from __future__ import annotations

from baton.cancelled import CancelledTasks


def test_the_oldest_cancelled_task_is_forgotten_first() -> None:
    tasks = CancelledTasks(remember=2)
    for task_id in ("t1", "t2", "t1", "t3"):
        tasks.add("acme", task_id)
    assert len(tasks) == 2
    assert ("acme", "t1") not in tasks  # heard first: a second cancel does not renew it
    assert ("acme", "t2") in tasks and ("acme", "t3") in tasks
    assert ("other", "t3") not in tasks
