"""Steps in flight, each counted by exactly one replica.

Any replica may dispatch a step and any other record its answer, so a gauge
raised where a step starts and lowered where it ends is wrong per replica
and, after a restart, wrong in sum. Instead a replica counts the runs whose
newest revision it wrote itself, with the in-flight steps of the state it
stored. A run another replica wrote since (or an erasure tombstoned) is
dropped at the next check against the store, so the sum over replicas is the
number of dispatched, unanswered steps in the run store, a cancel or the end
of a run included. Pure: the conductor feeds it writes and stored revisions.
"""

from __future__ import annotations

from collections.abc import Mapping


class InFlight:
    def __init__(self) -> None:
        self._runs: dict[str, tuple[int, int]] = {}  # run key -> (revision, steps)

    def wrote(self, key: str, revision: int, steps: int) -> None:
        """This replica stored ``key`` at ``revision`` with ``steps`` in flight."""
        if steps > 0:
            self._runs[key] = (revision, steps)
        else:
            self._runs.pop(key, None)

    def keys(self) -> list[str]:
        """The runs this replica counts (to check against the store)."""
        return list(self._runs)

    def check(self, stored: Mapping[str, int | None]) -> None:
        """Drop every run stored since at a newer revision than this
        replica's (revisions are the bucket's stream sequences, so they only
        grow) or gone (None). A write of its own after the read is newer than
        what was read, and stays; runs not in ``stored`` are kept."""
        for key, revision in stored.items():
            mine = self._runs.get(key)
            if mine is not None and (revision is None or revision > mine[0]):
                del self._runs[key]

    def total(self) -> int:
        return sum(steps for _, steps in self._runs.values())
