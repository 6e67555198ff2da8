"""Size limits of the v1 contract (bytes, counts, depths). Every service
enforces the same numbers. Not the tenants' rate limits: those are
``services/orchestrator/limits.py``."""

from __future__ import annotations

from typing import Final

MAX_INPUT_BYTES: Final = 64 * 1024
"""Largest ``input`` of a submitted task (UTF-8 bytes)."""

MAX_TASK_BYTES: Final = 96 * 1024
"""Largest whole task message on ``baton.tasks.*``."""

MAX_CONTEXT_MESSAGE_BYTES: Final = 256 * 1024
"""Largest single message appended to a session's history."""

MAX_CONTEXT_RECORD_BYTES: Final = 480 * 1024
"""Largest single append (all its messages), under the context stream's 512 KiB."""

MAX_ATTACHMENT_BYTES: Final = 512 * 1024
"""Largest attachment; it travels in one request under NATS's 1 MiB payload."""

MAX_GET_PAGE: Final = 1024
"""Most messages one ``get`` returns; page with ``start``."""

MAX_FORK_DEPTH: Final = 8
"""Forks of forks resolve at most this deep."""

MAX_METADATA_KEYS: Final = 32

MAX_OUTPUT_TOKENS: Final = 8192
"""Ceiling on any step's ``max_tokens``."""

MAX_SERVICE_MESSAGE_BYTES: Final = 4 * 1024
"""Jobs and results between services carry pointers, so they stay under this."""

MAX_DOCUMENT_BYTES: Final = 384 * 1024
"""Largest document (title + text) the search tool indexes."""


MAX_TOOL_OUTPUT_BYTES: Final = 256 * 1024
"""Largest result a tool may return; more is a ``tool_output_too_large`` error."""

INLINE_TOOL_RESULT_BYTES: Final = 8 * 1024
"""A tool result up to this size is the tool message itself; a larger one is
stored as an attachment of the session and the message holds its start."""


def document_too_large(title: str, text: str) -> str | None:
    """Why a document is over ``MAX_DOCUMENT_BYTES`` (UTF-8), or None when it fits."""
    if len(text.encode()) + len(title.encode()) > MAX_DOCUMENT_BYTES:
        return f"a document is at most {MAX_DOCUMENT_BYTES} bytes"
    return None
