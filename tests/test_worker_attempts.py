"""The worker's memory of the dispatches it took (pure)."""

from __future__ import annotations

from services.inference_worker.attempts import Attempts


def test_an_older_dispatch_of_a_job_is_refused_a_newer_or_the_same_taken() -> None:
    a = Attempts()
    assert a.take("j", 2)
    assert not a.take("j", 1)  # rescued after the retry: dropped
    assert a.take("j", 2)  # a redelivery of the one taken
    assert a.take("j", 3)
    assert a.take("k", 1)  # another job


def test_it_forgets_the_oldest_jobs_first() -> None:
    a = Attempts(remember=2)
    a.take("j1", 2)
    a.take("j2", 2)
    a.take("j1", 2)  # j1 used again: j2 is now the oldest
    a.take("j3", 1)
    assert len(a) == 2
    assert not a.take("j1", 1)  # remembered
    assert a.take("j2", 1)  # forgotten
