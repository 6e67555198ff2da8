"""Uploading a document for a tenant's ``search`` tool: one JetStream
publish on ``baton.docs.<tenant>.<doc_id>`` (used by the orchestrator's
``POST /v1/documents``; any client inside Baton's account can do the same).
"""

from __future__ import annotations

from baton.transport import Bus
from proto import subjects
from proto.limits import MAX_DOCUMENT_BYTES
from proto.messages import DocumentPut


class DocumentTooLarge(ValueError):
    pass


async def put_document(bus: Bus, doc: DocumentPut) -> int:
    """Store ``doc`` (replacing an earlier one with its id); returns its stream sequence.

    Raises:
        DocumentTooLarge: over ``MAX_DOCUMENT_BYTES``.
        ValueError: an id that cannot be a subject token.
    """
    if len(doc.text.encode()) + len(doc.title.encode()) > MAX_DOCUMENT_BYTES:
        raise DocumentTooLarge(f"a document is at most {MAX_DOCUMENT_BYTES} bytes")
    ack = await bus.publish(subjects.document(doc.tenant, doc.doc_id), doc)
    return int(ack.seq)
