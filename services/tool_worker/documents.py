"""Feeds the search index from the ``BATON_DOCUMENTS`` stream.

Every tool worker reads the whole stream (an ordered consumer starting after
the last sequence its index applied), so each replica's index holds every
tenant's documents. Erasure: the context store erases a tenant's documents
from the stream and broadcasts ``baton.docserased.<tenant>``; a worker that
was down then finds, at start, documents in its index that the stream no
longer holds and drops them (``reconcile``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from baton.bus import Bus, Message, Subscription
from proto import codec, subjects
from proto.messages import DocumentPut, DocumentsErased
from proto.sizes import document_too_large
from proto.streams import DOCUMENTS

from .tools.search import SearchIndex

log = structlog.get_logger("tool_worker")


class DocumentIndexer:
    def __init__(self, bus: Bus, index: SearchIndex) -> None:
        self.bus = bus
        self.index = index
        self._sub: Subscription | None = None
        self._applied = asyncio.Condition()

    async def start(self) -> None:
        await self.reconcile()
        start = self.index.last_seq
        self._sub = await self.bus.ordered(
            f"{subjects.DOCUMENTS}.>",
            stream=DOCUMENTS.name,
            start_seq=start + 1 if start else 0,
            cb=self._on_doc,
        )
        await self.bus.subscribe(f"{subjects.DOCUMENTS_ERASED}.*", DocumentsErased, self._on_erased)
        log.info("search_index_opened", documents=self.index.count(), resumed_after=start)
        await self.caught_up(timeout=30.0)

    async def reconcile(self) -> int:
        """Drop indexed documents the stream no longer holds (erased while down)."""
        found = await self.bus.subjects(DOCUMENTS.name, f"{subjects.DOCUMENTS}.>")
        live = {tuple(s.split(".")[2:4]) for s in found}
        gone: dict[str, set[str]] = {}
        for tenant, doc_id in self.index.documents() - live:
            gone.setdefault(tenant, set()).add(doc_id)
        dropped = sum(self.index.erase(t, ids) for t, ids in gone.items())
        if dropped:
            log.info("search_index_reconciled", dropped=dropped)
        return dropped

    async def _on_doc(self, msg: Message) -> None:
        seq = msg.seq
        try:
            doc = codec.decode(msg.data, DocumentPut)
            _, _, tenant, doc_id = msg.subject.split(".", 3)
            if doc.tenant != tenant or doc.doc_id != doc_id:
                # The subject's tenant is the publisher's (a tenant's own
                # account maps baton.docs.<doc_id> to it): the body may not differ.
                raise ValueError("the body's tenant or id is not the subject's")
            too_large = document_too_large(doc.title, doc.text)
            if too_large is not None:
                raise ValueError(too_large)
        except (codec.DecodeError, ValueError) as exc:
            log.warning("document_skipped", seq=seq, error=str(exc))
            self.index.skip(seq)
        else:
            self.index.put(tenant, doc_id, doc.title, doc.text, seq)
        async with self._applied:
            self._applied.notify_all()

    async def _on_erased(self, erased: DocumentsErased, _subject: str) -> None:
        n = self.index.erase(erased.tenant)
        log.info("search_documents_erased", tenant=erased.tenant, documents=n)

    async def caught_up(self, timeout: float = 2.0) -> bool:
        """Wait until every document published so far is indexed, so a search
        right after an upload sees it. False if that took over ``timeout``."""
        if self._sub is None:
            return False
        deadline = time.monotonic() + timeout
        while True:
            delivered, pending = await self._sub.position()
            if not pending and self.index.last_seq >= delivered:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            async with self._applied:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._applied.wait(), min(left, 0.05))
