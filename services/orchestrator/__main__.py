"""``baton-orchestrator``: run one orchestrator replica."""

from __future__ import annotations

from baton.service import Health, main_entry

from .service import start
from .settings import OrchestratorSettings

NAME = "orchestrator"


def main() -> None:
    settings = OrchestratorSettings()
    health = Health()
    main_entry(NAME, settings, lambda bus: start(bus, settings, health), tenant_data=True)


if __name__ == "__main__":
    main()
