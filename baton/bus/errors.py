"""The bus's errors, as Baton's own classes, and the translation from nats-py's.

Tree::

    TransportError
    ├── BusUnavailable   (no server answered ``connect``)
    ├── BusClosed        (the connection closed: the service is stopping)
    ├── NotFound         (no such message, key, stream or consumer)
    └── WrongLastSequence (a conditional write lost: read again, retry)

``TRANSIENT`` names nats-py's classes for "try an idempotent operation
again" (JetStream without a leader, NATS reconnecting).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import nats.errors
import nats.js.errors


class TransportError(Exception):
    """Base class of transport failures."""


class BusUnavailable(TransportError):
    """NATS could not be reached."""

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        super().__init__(f"cannot reach NATS at {url}: {cause or 'no server answered'}")
        self.url = url


class BusClosed(TransportError):
    """The connection was closed (the service is stopping)."""


class NotFound(TransportError):
    """No such message, key, stream or consumer."""


class WrongLastSequence(TransportError):
    """A conditional write lost: the subject or key moved on since the
    sequence or revision it named (read again and retry)."""


# JetStream briefly without a leader, or NATS reconnecting: an idempotent
# operation may be tried again. nats-py's own classes, named once here.
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)

_WRONG_LAST_SEQ = 10071  # JetStream: "wrong last sequence"
_SEQUENCE_NOT_FOUND = 10043
_DELETE_FAILED = 10057


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """nats-py's not-found and lost-conditional-write errors as Baton's."""
    try:
        yield
    except (nats.js.errors.NotFoundError, nats.js.errors.KeyNotFoundError) as exc:
        raise NotFound(str(exc)) from exc
    except nats.js.errors.KeyWrongLastSequenceError as exc:
        raise WrongLastSequence(str(exc)) from exc
    except nats.js.errors.APIError as exc:
        if exc.err_code == _WRONG_LAST_SEQ:
            raise WrongLastSequence(str(exc)) from exc
        raise


def _gone(exc: nats.js.errors.APIError) -> bool:
    """The message is not there (erased meanwhile by another replica, or
    acked). A delete says so three ways: a 404, a 400 'sequence N not found'
    (10043), or a 500 'no message found' (10057, which also means 'not
    permitted': that one still raises)."""
    if isinstance(exc, nats.js.errors.NotFoundError) or exc.err_code == _SEQUENCE_NOT_FOUND:
        return True
    return exc.err_code == _DELETE_FAILED and "no message found" in (exc.description or "")
