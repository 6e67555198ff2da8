"""Benchmarks: ``make bench`` (``python -m bench``). Each module has
``run(work: Path) -> dict`` and ``markdown(result) -> str``; results go to
``bench/results/<name>.json`` and the tables to ``docs/benchmarks.md``."""
