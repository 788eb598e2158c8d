"""A stand-in for systemd's notification socket: a real unix datagram socket to pass as
``$NOTIFY_SOCKET``, collecting what a service sends (``READY=1``, ``STATUS=``, ``WATCHDOG=1``)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


class NotifySocket:
    """Bound at ``path``, or in the abstract namespace (``@name``) when ``path`` is None."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"fleet-notify-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.env_value = "@" + name
        else:
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.messages: list[list[str]] = []

    def drain(self, wait: float = 0.0) -> list[list[str]]:
        """Datagrams received since the last call (each as its lines), listening ``wait`` s more."""
        got: list[list[str]] = []
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left > 0:
                self.sock.settimeout(left)
            else:
                self.sock.setblocking(False)
            try:
                got.append(self.sock.recv(4096).decode().split("\n"))
            except (BlockingIOError, TimeoutError):
                break
        self.messages.extend(got)
        return got

    def wait_for(self, line: str, timeout: float = 30.0) -> list[str]:
        """The first datagram holding ``line`` (a ``KEY=`` prefix matches), waiting for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for msg in self.messages[seen:]:
                if any(f == line or (line.endswith("=") and f.startswith(line)) for f in msg):
                    return msg
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line!r} notification in {timeout} s; got {self.messages!r}")
            self.drain(min(left, 0.1))

    def count(self, line: str) -> int:
        return sum(line in msg for msg in self.messages)

    def listen(self, wait: float = 0.1) -> int:
        """Listen ``wait`` s (the queue must not fill: a full one blocks the sender); the number
        of datagrams received so far."""
        self.drain(wait)
        return len(self.messages)

    def close(self) -> None:
        self.sock.close()
