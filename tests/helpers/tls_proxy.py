"""The smallest TLS terminator: Python's ``ssl`` in front of a plain-HTTP peer, bytes piped both
ways with asyncio streams. For peers that cannot serve TLS themselves (MLServer 1.7 has no TLS
setting for its REST server), the way a deployment puts a TLS load balancer in front of them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

from server.mqtt.broker import free_port


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.contextmanager
def tls_terminator(backend_port: int, cert: Path, key: Path) -> Iterator[str]:
    """``https://127.0.0.1:<port>`` forwarding every connection to ``127.0.0.1:backend_port``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    port = free_port()
    loop = asyncio.new_event_loop()
    servers: list[asyncio.Server] = []

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", backend_port)
        except OSError:
            client_w.close()  # the backend is down: the client sees the connection end
            return
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))

    async def start() -> None:
        servers.append(await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx))

    thread = threading.Thread(target=loop.run_forever, name="tls-terminator", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"https://127.0.0.1:{port}"
    finally:

        async def stop() -> None:
            for s in servers:
                s.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
