"""Uploading a document for a tenant's ``search`` tool: one JetStream
publish on ``baton.docs.<tenant>.<doc_id>`` (used by the orchestrator's
``POST /v1/documents``; any client inside Baton's account can do the same).
"""

from __future__ import annotations

from baton.bus import Bus
from proto import subjects
from proto.messages import DocumentPut
from proto.sizes import document_too_large


class DocumentTooLarge(ValueError):
    pass


async def put_document(bus: Bus, doc: DocumentPut) -> int:
    """Store ``doc`` (replacing an earlier one with its id); returns its stream sequence.

    Raises:
        DocumentTooLarge: over ``MAX_DOCUMENT_BYTES``.
        ValueError: an id that cannot be a subject token.
    """
    too_large = document_too_large(doc.title, doc.text)
    if too_large is not None:
        raise DocumentTooLarge(too_large)
    ack = await bus.publish(subjects.document(doc.tenant, doc.doc_id), doc)
    return int(ack.seq)
