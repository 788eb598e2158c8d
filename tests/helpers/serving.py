"""Run a stdlib HTTP(S) test server on a thread for the length of a ``with`` block."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import HTTPServer


@contextlib.contextmanager
def serving(
    server: HTTPServer, *, https: bool, after_close: Callable[[], None] | None = None
) -> Iterator[str]:
    """Serve ``server`` (bound to 127.0.0.1) on a daemon thread; yield its base URL. On exit it is
    shut down and closed, then ``after_close`` runs (e.g. to cut connections still open)."""
    server.daemon_threads = True  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"{'https' if https else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        if after_close is not None:
            after_close()
        thread.join(timeout=5)
