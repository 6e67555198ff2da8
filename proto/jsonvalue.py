"""Free-form values (a task's ``metadata``) that must read back as JSON.

MessagePack carries more than JSON: binary, extension types (timestamps
among them), maps keyed by numbers or bytes, NaN and infinities. A task's
metadata is stored with its run and served by the HTTP API as JSON, so a value
JSON cannot hold is refused at admission (``json_problem``), and one stored
before that rule is rendered as a placeholder (``json_safe``) rather than
failing the whole listing.

Pure: values in, a reason or a value out. Nesting is bounded before these run
(``proto.nesting``), so they may recurse.
"""

from __future__ import annotations

import math
from typing import Any


def json_problem(value: Any, where: str = "metadata") -> str | None:
    """Why ``value`` cannot be rendered as JSON as it is, or None."""
    if value is None or isinstance(value, bool | int | str):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} holds {value!r}, which JSON cannot"
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if (why := json_problem(item, f"{where}[{i}]")) is not None:
                return why
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has a {type(key).__name__} key {key!r}: keys must be strings"
            if (why := json_problem(item, f"{where}.{key}")) is not None:
                return why
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{where} holds binary data where text is expected"
    return f"{where} holds a {type(value).__name__} value, which JSON cannot hold"


def json_safe(value: Any) -> Any:
    """``value`` with everything JSON cannot hold replaced by a short text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return f"<{type(value).__name__}>"
