"""Many MQTT clients on one thread: one ``selectors`` selector and paho's external-loop API.

The socket callbacks (``on_socket_open``/``close``/``register_write``/``unregister_write``) keep a
selector registration per client, ready sockets get ``loop_read``/``loop_write``, and timers run on
the loop thread (:class:`Scheduler`). Only the blocking part of a connection, the TCP connect and
the TLS handshake inside paho's ``reconnect()``, runs on other threads; socket registrations
requested from those are queued and applied by the loop thread, which alone touches the selector.
Each client holds a socket: :func:`raise_open_files` makes room for them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Scheduler:
    """Timers on the loop thread: a heap of (due, n, fn)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._n = itertools.count()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay), next(self._n), fn))

    def run_due(self) -> float:
        """Run what is due; return seconds until the next timer (capped at 0.2)."""
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now:
            _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                log.exception("simulated device timer failed")
        return min(0.2, self._heap[0][0] - now) if self._heap else 0.2


class Mux:
    """The selector and the loop driving every client of this process."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.sched = Scheduler()
        self._loop_thread = threading.get_ident()
        self._ops: deque[tuple[str, mqtt.Client, Any]] = deque()
        #: clients with output queued on the loop thread, written at the end of the loop pass
        self._dirty: dict[mqtt.Client, None] = {}
        #: clients whose socket is registered for WRITE (their last write did not finish)
        self._wait_write: set[mqtt.Client] = set()

    # -- paho socket callbacks (possibly on a connect thread: queue them) ------------------------
    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = lambda c, u, s: self._op("open", c, s)
        client.on_socket_close = lambda c, u, s: self._op("close", c, s)
        client.on_socket_register_write = lambda c, u, s: self._op("w+", c, s)
        client.on_socket_unregister_write = lambda c, u, s: self._op("w-", c, s)

    def _op(self, op: str, client: mqtt.Client, sock: Any) -> None:
        if threading.get_ident() != self._loop_thread:
            self._ops.append((op, client, sock))
        elif op == "w+":
            # output queued by a callback on the loop thread (a report, a PUBACK): written after
            # this pass, with no selector change; most writes finish at once, and asking epoll
            # for WRITE and back cost two system calls per message
            self._dirty[client] = None
        elif op == "w-":
            if client in self._wait_write:
                self._apply(op, client, sock)
        else:
            self._apply(op, client, sock)

    def _flush(self) -> None:
        """Write what callbacks queued; wait for WRITE only where the socket did not take it all."""
        while self._dirty:
            client = next(iter(self._dirty))
            del self._dirty[client]
            sock = client.socket()
            if sock is None:
                continue
            client.loop_write()
            if client.want_write() and client.socket() is sock and client not in self._wait_write:
                self._apply("w+", client, sock)

    def _apply(self, op: str, client: mqtt.Client, sock: Any) -> None:
        try:
            if op == "open":
                self.sel.register(sock, READ, client)
            elif op == "close":
                self._dirty.pop(client, None)
                self._wait_write.discard(client)
                self.sel.unregister(sock)
            elif op == "w+":
                self._wait_write.add(client)
                self.sel.modify(sock, READ | WRITE, client)
            else:
                self._wait_write.discard(client)
                self.sel.modify(sock, READ, client)
        except (KeyError, ValueError, OSError):
            pass  # a socket closed before its registration was applied

    # -- the loop -------------------------------------------------------------------------------
    def run_once(self) -> None:
        while self._ops:
            self._apply(*self._ops.popleft())
        timeout = self.sched.run_due()
        self._flush()  # what the timers published
        if not self.sel.get_map():
            time.sleep(timeout)
            return
        for key, mask in self.sel.select(timeout):
            client: mqtt.Client = key.data
            sock = key.fileobj
            if mask & READ:
                client.loop_read()
                for _ in range(64):  # TLS may hold whole packets already decrypted
                    if client.socket() is not sock or not getattr(sock, "pending", lambda: 0)():
                        break
                    client.loop_read()
            if mask & WRITE and client.socket() is sock:
                client.loop_write()
        self._flush()


def raise_open_files(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (children inherit it); return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit to %d: %s", wanted, exc)
        return soft
    return target
