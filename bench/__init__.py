"""Benchmarks: ``make bench`` (``python -m bench``). Each module has
``run(work: Path) -> dict`` and ``markdown(result) -> str``; results go to
``bench/results/<name>.json`` and the tables to ``docs/benchmarks.md``."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
"""Where each benchmark's JSON is written (``<name>.json``)."""
