"""The tools the orchestrator can offer models, as the tool pools publish
them in bucket ``baton-tools``
(``ToolCatalog`` per pool), followed with a bucket watch so a pool that starts
is offered at once."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from baton.bus import Bucket
from proto import codec
from proto.messages import ToolCatalog, ToolSpec

log = structlog.get_logger("orchestrator")

WATCH_INACTIVE = 30.0  # seconds the server keeps the watch's consumer without its client


class ToolCatalogs:
    def __init__(self) -> None:
        self._specs: dict[str, ToolSpec] = {}
        self._pools: dict[str, dict[str, ToolSpec]] = {}

    def spec(self, name: str) -> ToolSpec | None:
        """The spec to offer for ``name``, as a tool pool serving it published
        it. None when no pool serves it: the agent is then offered no such tool
        and answers without it, rather than waiting on calls nobody runs."""
        return self._specs.get(name)

    def pools(self) -> list[str]:
        """The tool pools that published a catalog."""
        return sorted(self._pools)

    def apply(self, pool: str, catalog: ToolCatalog | None) -> None:
        self._pools[pool] = {t.name: t for t in catalog.tools} if catalog else {}
        specs: dict[str, ToolSpec] = {}
        for _, tools in sorted(self._pools.items()):
            for name, t in tools.items():
                specs.setdefault(name, t)
        self._specs = specs

    async def watch(self, bucket: Bucket) -> None:
        """Follow every pool's entry (the current ones first, then changes)."""
        while True:
            try:
                async for entry in bucket.follow(inactive_threshold=WATCH_INACTIVE):
                    catalog = None
                    if entry.value and not entry.deleted:
                        with contextlib.suppress(codec.DecodeError):
                            catalog = codec.decode(entry.value, ToolCatalog)
                    self.apply(entry.key, catalog)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("tool_catalog_watch_failed", error=repr(exc))
                await asyncio.sleep(2.0)
