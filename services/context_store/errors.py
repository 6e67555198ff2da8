"""The context store's one exception: a refusal with a stable error code."""

from __future__ import annotations

from proto.errors import ErrorCode
from proto.messages import ErrorInfo


class ContextError(Exception):
    """A request the store refuses; becomes the reply's ``error``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def info(self) -> ErrorInfo:
        return ErrorInfo.of(self.code, self.message)
