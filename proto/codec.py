"""The one codec: MessagePack through msgspec typed structs.

One encoder per process and one decoder per type, reused (decoders are cached).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()

DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain data) to MessagePack."""
    return _encoder.encode(obj)


@lru_cache(maxsize=64)
def _decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(type_)


def decode(data: bytes, type_: type[T]) -> T:
    """Decode and validate ``data`` as ``type_``. Raises ``DecodeError``
    (``ValidationError`` is a subclass) on bad input."""
    decoder: msgspec.msgpack.Decoder[T] = _decoder(type_)  # type: ignore[arg-type]
    return decoder.decode(data)


def decode_any(data: bytes) -> Any:
    """Decode untyped MessagePack (for diagnostics of rejected input)."""
    return msgspec.msgpack.decode(data)
