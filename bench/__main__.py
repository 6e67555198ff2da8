"""``make bench``: run every benchmark module in ``bench/`` that defines
``run(out_dir) -> dict`` and write its results under ``bench/results/``."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path

OUT = Path(__file__).with_name("results")


def main(names: list[str]) -> None:
    here = Path(__file__).parent
    found = [m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_")]
    for name in names or sorted(found):
        module = importlib.import_module(f"bench.{name}")
        if hasattr(module, "run"):
            print(f"== bench.{name}")
            print(json.dumps(module.run(OUT), indent=2)[:4000])


if __name__ == "__main__":
    main(sys.argv[1:])
