"""Child processes of the server: tied to its life, supervised, and stopped with it.

Every child the server starts (Mosquitto, the ingest processes) gets ``PR_SET_PDEATHSIG`` on
Linux: the kernel signals it when the server dies, SIGKILL included. Elsewhere there is no such
call and a child outlives a killed server (the ingest processes still exit when their pipe
closes). :func:`stop_on_sigterm` turns SIGTERM into a normal exit, so cleanup runs as on Ctrl-C.
:func:`take_service_manager_env` keeps systemd's notification variables from every child.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from types import FrameType

#: linux/prctl.h
PR_SET_PDEATHSIG = 1
#: what systemd tells the main process of a ``Type=notify`` unit with a watchdog: for it alone
SERVICE_MANAGER_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


#: loaded once here: a ``preexec_fn`` runs between fork and exec and should do as little as it can
_PRCTL = _load_prctl()


def set_death_signal(sig: int, parent_pid: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux only; False
    elsewhere). The signal fires when the *thread* that started this process exits, so start
    children from a thread that lives as long as they should. ``parent_pid``: if the parent is
    already gone (it died before the call), ``sig`` is sent at once."""
    if _PRCTL is None or _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return True


def death_signal_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``subprocess.Popen(preexec_fn=...)`` that gives the child ``sig`` when this process dies,
    or None where that is not available."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        set_death_signal(sig, parent)

    return preexec


def take_service_manager_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Remove ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` from ``environ`` (this
    process's environment by default) and return them: called before the first child starts, so
    that no child (Mosquitto, the ingest processes, the cloud tier, however it is started)
    inherits them and talks to the service manager in the server's name; the server notifies
    with what this returns (libsystemd's ``unset_environment``)."""
    environ = os.environ if environ is None else environ
    return {name: environ.pop(name) for name in SERVICE_MANAGER_VARS if name in environ}


@contextlib.contextmanager
def stop_on_sigterm(code: int = 0) -> Iterator[None]:
    """Inside the block SIGTERM raises ``SystemExit(code)`` (once), so ``finally`` clauses stop
    the children as they do on Ctrl-C. Python's default for SIGTERM is to die on the spot.
    uvicorn installs its own handler while it serves and, after a graceful shutdown, raises the
    signal again: it lands here."""
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise SystemExit(code)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Backoff:
    """Delays between restarts of a child: ``first`` after a long life, doubling with each quick
    death in a row up to ``maximum``; a child that ran ``stable_s`` starts again from ``first``."""

    def __init__(self, first: float = 1.0, maximum: float = 30.0, stable_s: float = 60.0) -> None:
        self.first = first
        self.maximum = maximum
        self.stable_s = stable_s
        self._next = first

    def delay(self, lived_s: float) -> float:
        if lived_s >= self.stable_s:
            self._next = self.first
        delay = self._next
        self._next = min(delay * 2, self.maximum)
        return delay


def _listening_inodes(port: int, proc: Path) -> set[str] | None:
    """Socket inodes listening on TCP ``port`` (any address, IPv4 or IPv6), from /proc/net."""
    inodes: set[str] = set()
    found = False
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st ... inode; st 0A is LISTEN
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if found else None


def owns_listener(pid: int, port: int, proc: Path = Path("/proc")) -> bool | None:
    """Whether process ``pid`` holds the socket listening on TCP ``port``; None when /proc cannot
    tell (not Linux, or the process's descriptors are not readable)."""
    inodes = _listening_inodes(port, proc)
    if inodes is None:
        return None
    try:
        fds = list((proc / str(pid) / "fd").iterdir())
    except FileNotFoundError:
        return False  # the process is gone
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False
