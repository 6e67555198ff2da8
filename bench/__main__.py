"""``make bench``: run every benchmark, write JSON and docs/benchmarks.md.

``python -m bench [name ...] [--long]`` runs a subset; the document is
rebuilt from every JSON present under bench/results/ (``--doc``: only that). ``--long`` runs the
slow parts too (the orchestrator's RSS to 50,000 steps).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import RESULTS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
ORDER = ["worker", "model", "context", "orchestrator", "steppath", "conflicts", "routing", "tokens",
         "tools", "toolpath", "auth", "security", "fairness", "fairwork", "scaling", "placement",
         "placement_vllm", "prewarm", "coldstart", "tracing", "console"]  # fmt: skip

HEADER = """# Benchmarks

Produced by `make bench` (`python -m bench [name ...]`) on this project's
machines (2 shared cores, no GPU); raw figures in `bench/results/*.json`.
Absolute numbers move up to 2x between runs on shared cores, so every claim
is a ratio measured within one run.
"""


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if "--long" in argv:
        os.environ["BATON_BENCH_LONG"] = "1"
    argv = [a for a in argv if a != "--long"]
    names = argv or [n for n in ORDER if (ROOT / "bench" / f"{n}.py").exists()]
    if names == ["--doc"]:
        names = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names:
        mod = importlib.import_module(f"bench.{name}")
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
            result = mod.run(Path(work))
        result["bench_seconds"] = round(time.time() - t0, 1)
        result.setdefault("measured_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"bench {name}: {json.dumps(result)}", flush=True)
    sections = [HEADER]
    for name in ORDER:
        path = RESULTS / f"{name}.json"
        if path.exists() and (ROOT / "bench" / f"{name}.py").exists():
            mod = importlib.import_module(f"bench.{name}")
            sections.append(mod.markdown(json.loads(path.read_text())))
    DOC.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
