"""``baton-tool-worker``: run one tool worker."""

from __future__ import annotations

from baton.bus import Bus
from baton.service import Health, ServiceApp, health_app, main_entry

from .settings import ToolWorkerSettings
from .worker import ToolWorker

NAME = "tool-worker"


def main() -> None:
    settings = ToolWorkerSettings()
    health = Health()
    app = health_app("Baton tool worker", health)

    async def start(bus: Bus) -> ServiceApp:
        return ServiceApp(app, ToolWorker(settings, health, bus).run)

    main_entry(NAME, settings, start)


if __name__ == "__main__":
    main()
