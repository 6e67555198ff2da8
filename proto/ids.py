"""Identifiers that become NATS subject tokens."""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec

ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
_ID_RE: Final = re.compile(ID_PATTERN)

# A str that msgspec validates on decode: tenant, task_id, session, workflow.
Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]


def is_valid_id(value: object) -> bool:
    """True when ``value`` may be used as a subject token."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


def require_id(value: str, what: str) -> str:
    """Return ``value`` or raise ``ValueError`` naming ``what``."""
    if not is_valid_id(value):
        raise ValueError(f"{what} must match {ID_PATTERN}, got {value!r}")
    return value
