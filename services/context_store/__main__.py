"""``baton-context-store``: run the context store service."""

from __future__ import annotations

from typing import Any

from baton.service import Health, main_entry, serve

from .http import http_app
from .service import run
from .settings import ContextStoreSettings

NAME = "context-store"


def main() -> None:
    settings = ContextStoreSettings()
    health = Health()
    holder: list[Any] = []
    app = http_app(health, lambda: holder[0] if holder else None, settings.api_keys)
    main_entry(
        NAME,
        settings,
        lambda: serve(NAME, settings, app, lambda bus: run(bus, settings, health, holder)),
        tenant_data=True,
    )


if __name__ == "__main__":
    main()
