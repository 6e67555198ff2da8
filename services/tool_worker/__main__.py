"""``baton-tool-worker``: run one tool worker."""

from __future__ import annotations

from baton.service import Health, health_app, main_entry, serve

from .settings import ToolWorkerSettings
from .worker import ToolWorker

NAME = "tool-worker"


def main() -> None:
    settings = ToolWorkerSettings()
    health = Health()
    worker = ToolWorker(settings, health)
    app = health_app("Baton tool worker", health)
    main_entry(NAME, settings, lambda: serve(NAME, settings, app, worker.run))


if __name__ == "__main__":
    main()
