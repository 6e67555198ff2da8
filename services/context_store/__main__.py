"""``baton-context-store``: run the context store service."""

from __future__ import annotations

from baton.service import Health, main_entry

from .service import start
from .settings import ContextStoreSettings

NAME = "context-store"


def main() -> None:
    settings = ContextStoreSettings()
    health = Health()
    main_entry(NAME, settings, lambda bus: start(bus, settings, health), tenant_data=True)


if __name__ == "__main__":
    main()
