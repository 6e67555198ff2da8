"""A coalescing socket writer for nats-py (a patch of its private flusher,
applied only to the nats-py versions it was written against)."""

from __future__ import annotations

import asyncio
import importlib.metadata

from nats.aio.client import Client as NATS

# The nats-py releases whose private writer (``_flusher``, ``_flush_queue``,
# ``_pending``, ``_pending_data_size``, ``_transport``) this patch was written
# against; any other keeps its own flusher.
PATCHED: tuple[tuple[int, int], tuple[int, int]] = ((2, 16), (3, 0))


def _nats_version() -> tuple[int, int]:
    try:
        major, minor, *_ = importlib.metadata.version("nats-py").split(".")
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def patchable() -> bool:
    """The installed nats-py is one the coalescing flusher was written for."""
    low, high = PATCHED
    return low <= _nats_version() < high


async def _coalescing_flusher(nc: NATS) -> None:
    """nats-py's socket writer, waiting one more pass of the event loop
    before it writes.

    nats-py queues every command and wakes its flusher task once, which
    writes whatever is pending then. A transition's publishes, the acks of a
    batch of deliveries and the requests of concurrent handlers are made by
    tasks that run in the *same* loop pass as the flusher or the one after, so
    the stock flusher writes them one syscall each (the socket write was the
    largest single cost in every service's profile). Yielding once lets them
    join one write; a lone message waits one loop pass (microseconds)."""
    queue = nc._flush_queue
    assert queue is not None
    while nc.is_connected and not nc.is_connecting:
        waiting = [await queue.get()]
        try:
            await asyncio.sleep(0)
            while not queue.empty():  # flush requests that joined meanwhile
                waiting.append(queue.get_nowait())
            if nc._pending_data_size > 0:
                pending, nc._pending, nc._pending_data_size = nc._pending, [], 0
                assert nc._transport is not None
                nc._transport.writelines(pending)
                await nc._transport.drain()
        except OSError as exc:
            await nc._error_cb(exc)
            await nc._process_op_err(exc)
            break
        except (asyncio.CancelledError, RuntimeError, AttributeError):
            break
        finally:
            for fut in waiting:
                if not fut.done():
                    fut.set_result(None)


def coalesce_writes(nc: NATS) -> None:
    """Give ``nc`` the coalescing flusher (kept across reconnects: nats-py
    starts its flusher through the instance's ``_flusher``)."""
    if not patchable() or not hasattr(nc, "_flusher") or not hasattr(nc, "_pending_data_size"):
        return  # another nats-py: its own flusher stays
    nc._flusher = lambda: _coalescing_flusher(nc)  # type: ignore[method-assign]
