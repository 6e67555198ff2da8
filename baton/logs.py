"""structlog configuration shared by every service.

Every line is JSON with ``service`` and whatever the handler bound with
``structlog.contextvars.bind_contextvars`` (``task_id``, ``trace_id``...).
Fields that may hold prompts or completions are redacted unless
``log_prompts`` is set.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

REDACTED_KEYS = frozenset({"input", "prompt", "content", "messages", "output", "text"})
SECRET_KEYS = frozenset({"api_key", "context_key", "token", "password", "secret"})


def _redactor(log_prompts: bool) -> structlog.types.Processor:
    def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event):
            if key in SECRET_KEYS:
                event[key] = "[secret]"
            elif not log_prompts and key in REDACTED_KEYS and isinstance(event[key], str):
                event[key] = f"[{len(event[key])} chars]"
        return event

    return redact


def configure(
    service: str, *, level: str = "INFO", json: bool = True, log_prompts: bool = False
) -> None:
    """Configure structlog (and stdlib logging) for one service process."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redactor(log_prompts),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
