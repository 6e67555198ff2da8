"""Child processes of ``baton up`` and the ports they hold (Linux).

``die_with_parent`` makes a child receive SIGTERM when the process that
started it dies, however it dies (SIGKILL included), so a killed ``baton up``
leaves no service behind. ``port_free`` asks the question a server's own bind
answers (``SO_REUSEADDR``: a port whose last connections linger in TIME_WAIT is
free), and ``port_holder`` names the process that listens on a port.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when its parent dies.

    The signal follows the *thread* that started the child: start such
    children from the main thread of a process that lives as long as they
    should (``baton up``), never from a worker thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could bind ``host:port`` now, as uvicorn and
    nats-server do (``SO_REUSEADDR``: TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_LISTEN = "0A"


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def port_holder(port: int) -> str | None:
    """``"pid 1234 (nats-server -c ...)"`` for the process listening on
    ``port``, or None when none is found (or it belongs to another user)."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                    return f"pid {proc.name} ({cmd[:80]})"
    return None
