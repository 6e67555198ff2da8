"""The one codec: MessagePack through msgspec typed structs.

One encoder per process and one decoder per type, reused (decoders are cached).
Every decode first bounds the nesting depth (``proto.nesting``) without
recursing, so hostile input is a ``DecodeError`` like any other bad body,
never a ``RecursionError``. The bound costs one C-speed pass for nearly every
body (``nesting.shallow``); only bodies with many bytes that could open a
container get the full scan.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, TypeVar

import msgspec

from proto import nesting

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()

DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError


class TooDeep(msgspec.DecodeError):
    """Nested deeper than ``nesting.MAX_DEPTH``. ``top`` holds the top-level
    map's short string values (tenant, task_id, session) read on the way."""

    def __init__(self, exc: nesting.TooDeep) -> None:
        super().__init__(str(exc))
        self.top = exc.top


def _bounded(data: bytes) -> None:
    try:
        nesting.check(data)
    except nesting.TooDeep as exc:
        raise TooDeep(exc) from None
    except nesting.Malformed as exc:
        raise msgspec.DecodeError(str(exc)) from None


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain data) to MessagePack."""
    return _encoder.encode(obj)


@lru_cache(maxsize=64)
def _decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(type_)


def decode(data: bytes, type_: type[T]) -> T:
    """Decode and validate ``data`` as ``type_``. Raises ``DecodeError``
    (``ValidationError`` and ``TooDeep`` are subclasses) on any bad input,
    invalid UTF-8 included."""
    _bounded(data)
    decoder: msgspec.msgpack.Decoder[T] = _decoder(type_)  # type: ignore[arg-type]
    try:
        return decoder.decode(data)
    except UnicodeDecodeError as exc:  # msgspec lets invalid UTF-8 escape as this
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {exc.reason}") from None


def convert(raw: Any, type_: type[T]) -> T:
    """Validate data ``decode_any`` returned as ``type_``: the rules of
    ``decode`` (``ValidationError``), without parsing the bytes again."""
    return msgspec.convert(raw, type_)


def decode_own(data: bytes, type_: type[T]) -> T:
    """Decode bytes Baton itself encoded and stored (a run's state in its bucket),
    never input from outside: the nesting scan, a pure-Python pass over every
    item, is skipped (it was most of the cost of reading a run)."""
    decoder: msgspec.msgpack.Decoder[T] = _decoder(type_)  # type: ignore[arg-type]
    return decoder.decode(data)


def decode_any(data: bytes) -> Any:
    """Decode untyped MessagePack (for diagnostics of rejected input)."""
    _bounded(data)
    try:
        return msgspec.msgpack.decode(data)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {exc.reason}") from None
