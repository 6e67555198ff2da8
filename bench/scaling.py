"""Scaling policies (issue #20), simulated: ``deploy/scaling/sim.py`` replays
the seeded bursty day against one always-on pool, one pool scaling to zero
and two pools placed by the scheduler (with and without spill-over, with
pre-warming, with a day floor on the large pool). Seconds of CPU, no
services; rewrites docs/scaling-policies.png. A model with estimated GPU
figures, not a measurement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.scaling import sim


def run(work: Path) -> dict[str, Any]:
    del work  # nothing to start
    return sim.run_all()


def markdown(result: dict[str, Any]) -> str:
    return sim.markdown(result)
