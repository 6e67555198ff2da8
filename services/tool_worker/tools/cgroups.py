"""One cgroup per sandbox slot, where the worker may create them: CPU-time
accounting (``getrusage`` cannot see through bubblewrap's PID namespace) and
a hard cap on the number of processes (``pids.max``) however they are forked.

cgroup v2 (``/sys/fs/cgroup/cgroup.controllers`` exists) and v1 (separate
``cpuacct`` and ``pids`` hierarchies) are both handled. Where cgroups are not
writable (an unprivileged container), ``SlotCgroup.create`` returns None and
the sandbox relies on its rlimits alone; CPU seconds then read 0.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
GROUP = "baton-sandbox"


@dataclass(frozen=True, slots=True)
class SlotCgroup:
    procs: tuple[Path, ...]  # cgroup.procs files the sandboxed process joins
    cpu_file: Path
    v2: bool
    pids_file: Path

    @classmethod
    def create(cls, slot: int, pids_max: int, root: Path = ROOT) -> SlotCgroup | None:
        name = f"{GROUP}/slot-{slot}"
        try:
            if (root / "cgroup.controllers").exists():
                base = root / GROUP
                base.mkdir(exist_ok=True)
                with contextlib.suppress(OSError):
                    (base / "cgroup.subtree_control").write_text("+pids +cpu")
                path = root / name
                path.mkdir(exist_ok=True)
                (path / "pids.max").write_text(str(pids_max))
                return cls((path / "cgroup.procs",), path / "cpu.stat", True, path / "pids.current")
            cpu, pids = root / "cpuacct" / name, root / "pids" / name
            cpu.mkdir(parents=True, exist_ok=True)
            pids.mkdir(parents=True, exist_ok=True)
            (pids / "pids.max").write_text(str(pids_max))
            return cls((cpu / "cgroup.procs", pids / "cgroup.procs"), cpu / "cpuacct.usage", False,
                       pids / "pids.current")  # fmt: skip
        except OSError:
            return None

    def join(self) -> None:
        """Move the calling process in (run between fork and exec)."""
        pid = str(os.getpid())
        for procs in self.procs:
            procs.write_text(pid)

    def settle(self, timeout: float = 2.0) -> int:
        """Wait for the slot's processes to be gone (a killed PID namespace is
        torn down asynchronously); returns how many are left. Members are read
        from the member list: the kernel uncharges ``pids.current`` only when
        an exited task is freed, over a second later here, so that count is
        only waited on while it would leave a new run less than half its
        process budget (after a fork bomb)."""
        deadline = time.monotonic() + timeout
        budget = self._pids_max()
        while True:
            try:
                left = len(self.procs[-1].read_text().split())
                charged = int(self.pids_file.read_text().strip())
            except (OSError, ValueError):
                return 0
            if (left == 0 and charged <= budget // 2) or time.monotonic() > deadline:
                return left
            time.sleep(0.02)

    def _pids_max(self) -> int:
        try:
            return int((self.pids_file.parent / "pids.max").read_text().strip())
        except (OSError, ValueError):
            return 1 << 30

    def cpu_seconds(self) -> float:
        """Cumulative CPU time of everything that ran in the slot."""
        try:
            text = self.cpu_file.read_text()
        except OSError:
            return 0.0
        if not self.v2:
            return int(text.strip()) / 1e9
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return 0.0
