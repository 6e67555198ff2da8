"""A bound on MessagePack nesting, checked before anything recurses.

msgspec decodes nested arrays and maps recursively: a body nested 10,000
deep raises ``RecursionError`` (not ``DecodeError``), which a consumer takes
for a crash and redelivers. ``scan`` walks the bytes with an explicit stack
(no recursion, one pass, O(len)) and refuses nesting deeper than
``MAX_DEPTH``. On the way it reads the top-level map's short string values,
so a refused body can still be answered (its ``tenant`` and ``task_id``).

Pure: bytes in, a ``Scan`` or ``TooDeep`` / ``Malformed`` out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

MAX_DEPTH: Final = 32
"""Deepest nesting of arrays/maps any Baton message may have (the deepest
real one, a job's JSON schema inside a map, is under 10)."""

_TOP_KEYS: Final = frozenset({"tenant", "task_id", "session"})


class NestingError(ValueError):
    """Base: the body cannot be decoded safely."""


class TooDeep(NestingError):
    def __init__(self, depth: int, top: dict[str, str], limit: int = MAX_DEPTH) -> None:
        super().__init__(f"nesting deeper than {limit} levels (reached {depth})")
        self.depth = depth
        self.top = top


class Malformed(NestingError):
    """Not MessagePack: a reserved byte or a truncated item."""


@dataclass(slots=True)
class Scan:
    depth: int
    items: int
    top: dict[str, str] = field(default_factory=dict)


# Fixed-size payloads after the type byte, by type byte.
_FIXED: Final = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,
    0xCA: 4, 0xCB: 8,
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}  # fmt: skip
# Length-prefixed payloads: type byte -> (length bytes, extra bytes (ext type)).
_SIZED: Final = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str
}  # fmt: skip
_STR8_32: Final = frozenset({0xD9, 0xDA, 0xDB})
# Containers with a length prefix: type byte -> (length bytes, items per entry).
_CONTAINERS: Final = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
_UINT: Final = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}


def scan(data: bytes | bytearray | memoryview, max_depth: int = MAX_DEPTH) -> Scan:
    """Walk one MessagePack value iteratively.

    Raises:
        TooDeep: arrays/maps nest deeper than ``max_depth``.
        Malformed: the bytes end inside an item or use the reserved 0xC1.
    """
    buf = bytes(data)
    end = len(buf)
    pos = 0
    items = 0
    stack: list[int] = []  # items still to read in each open container
    top: dict[str, str] = {}
    top_map = end > 0 and (0x80 <= buf[0] <= 0x8F or buf[0] in (0xDE, 0xDF))
    key: str | None = None  # the pending top-level key (odd position)
    expect_key = True
    deepest = 0
    while True:
        if pos >= end:
            if stack or items == 0:
                raise Malformed("truncated MessagePack")
            break
        b = buf[pos]
        pos += 1
        items += 1
        children = 0
        container = False
        text: str | None = None
        if b <= 0x7F or b >= 0xE0:
            pass
        elif b <= 0x8F:
            children, container = 2 * (b & 0x0F), True
        elif b <= 0x9F:
            children, container = b & 0x0F, True
        elif b <= 0xBF:
            n = b & 0x1F
            if len(stack) == 1 and top_map:
                text = buf[pos : pos + n].decode("utf-8", "replace")
            pos += n
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _SIZED:
            width, extra = _SIZED[b]
            if pos + width > end:
                raise Malformed("truncated length")
            (n,) = _UINT[width].unpack_from(buf, pos)
            pos += width + extra
            if b in _STR8_32 and len(stack) == 1 and top_map and n <= 256:
                text = buf[pos : pos + n].decode("utf-8", "replace")
            pos += n
        elif b in _CONTAINERS:
            width, per = _CONTAINERS[b]
            if pos + width > end:
                raise Malformed("truncated length")
            (n,) = _UINT[width].unpack_from(buf, pos)
            pos += width
            children, container = per * n, True
        else:  # 0xC1: reserved, never valid
            raise Malformed(f"reserved byte 0x{b:02x} at {pos - 1}")
        if pos > end:
            raise Malformed("truncated MessagePack")
        if len(stack) == 1 and top_map:  # an entry of the top-level map
            if expect_key:
                key = text
            elif key in _TOP_KEYS and text is not None:
                top[key] = text
            expect_key = not expect_key
        if stack:
            stack[-1] -= 1
        if container:
            deepest = max(deepest, len(stack) + 1)
        if children:
            stack.append(children)
        while stack and stack[-1] == 0:
            stack.pop()
        if not stack:
            break
    # The walk goes on past the limit (its stack is a list, not recursion), so
    # ids stored after a deep value are still read for the answer.
    if deepest > max_depth:
        raise TooDeep(deepest, top, max_depth)
    return Scan(depth=deepest, items=items, top=top)


# Every array or map starts with one of these bytes; anything else may also
# contain them (string bytes, numbers), never fewer.
_CONTAINER_BYTES: Final = bytes([*range(0x80, 0xA0), *range(0xDC, 0xE0)])
_OTHER_BYTES: Final = bytes(b for b in range(256) if b not in _CONTAINER_BYTES)


def shallow(data: bytes | bytearray, max_depth: int = MAX_DEPTH) -> bool:
    """True when ``data`` certainly nests no deeper than ``max_depth``: it
    holds at most that many bytes that could open an array or a map. One
    C-speed pass (``bytes.translate``) instead of the item-by-item ``scan``;
    False only means "scan to know" (long non-ASCII text, many floats)."""
    return len(data.translate(None, _OTHER_BYTES)) <= max_depth


def check(data: bytes | bytearray | memoryview, max_depth: int = MAX_DEPTH) -> None:
    """``scan`` for its exceptions only (``Malformed`` is reported by a scan
    only: ``shallow`` bodies are left to the decoder, which refuses them too)."""
    if not isinstance(data, memoryview) and shallow(data, max_depth):
        return
    scan(data, max_depth)
