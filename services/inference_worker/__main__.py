"""``baton-inference-worker``: run one inference worker."""

from __future__ import annotations

import sys

from fastapi import Depends, HTTPException

from baton.bus import Bus
from baton.models import ModelMissing
from baton.service import Health, ServiceApp, caller_scope, health_app, main_entry

from .engines import build_engine
from .engines.vllm_args import EngineArgsError
from .settings import WorkerSettings
from .worker import Worker

NAME = "inference-worker"


def main() -> None:
    settings = WorkerSettings()
    health = Health()
    try:
        engine = build_engine(settings)
    except ModelMissing as exc:  # a setup step not done: restarting will not help
        sys.exit(f"baton-inference-worker: {exc}")
    app = health_app("Baton inference worker", health)

    scope = caller_scope(settings.api_keys)

    @app.post("/debug/inject-oom", include_in_schema=False)
    def inject_oom(count: int = 1, caller: str | None = Depends(scope)) -> dict[str, int]:
        """Fault injection, simulator only: the next generations raise an OOM.
        With API keys configured, only an operator key may call it."""
        if caller is not None:
            raise HTTPException(403, "fault injection needs an operator key")
        inject = getattr(engine, "inject_oom", None)
        if inject is None:
            raise HTTPException(404, "fault injection needs the simulator engine")
        inject(count)
        return {"injected": count}

    async def start(bus: Bus) -> ServiceApp:
        return ServiceApp(app, Worker(settings, engine, health, bus).run)

    try:
        main_entry(NAME, settings, start)
    except EngineArgsError as exc:  # a configuration mistake: restarting will not help
        sys.exit(f"baton-inference-worker: invalid engine arguments: {exc}")


if __name__ == "__main__":
    main()
