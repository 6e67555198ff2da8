"""``baton-orchestrator``: run one orchestrator replica."""

from __future__ import annotations

from baton.service import Health, main_entry, serve

from .api import Services, build_app
from .service import run
from .settings import OrchestratorSettings

NAME = "orchestrator"


def main() -> None:
    settings = OrchestratorSettings()
    health = Health()
    svc = Services()
    app = build_app(settings, health, svc)
    main_entry(
        NAME,
        settings,
        lambda: serve(NAME, settings, app, lambda bus: run(bus, settings, health, svc)),
        tenant_data=True,
    )


if __name__ == "__main__":
    main()
