"""A real local HTTP(S) server for download tests: Range support, mid-body cuts, slow drips, chunked."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers.serving import serving


@dataclass
class Behaviour:
    content: bytes = b""
    #: cut the connection after this many body bytes, for the next ``cuts`` responses
    cut_after: int | None = None
    cuts: int = 0
    #: (bytes per write, seconds between writes)
    drip: tuple[int, float] | None = None
    honour_range: bool = True
    #: answer the next N ranged requests with 416
    force_416: int = 0
    require_token: str | None = None
    status: int | None = None
    #: answer the next N requests with ``status_once`` (a transient server error), then normally
    status_once: int = 503
    fail_next: int = 0
    #: announce this Content-Length instead of the real one
    fake_length: int | None = None
    #: bytes sent after the body (counted in Content-Length, not in Content-Range)
    extra: bytes = b""
    #: send no Content-Length: the body ends when the connection closes
    no_length: bool = False
    #: send the body with ``Transfer-Encoding: chunked`` (chunks of ``chunk`` bytes)
    chunked: bool = False
    chunk: int = 64 * 1024
    #: close the next N connections without answering (the request was read, no status line sent)
    drop_next: int = 0
    #: answer the next N requests only after ``stall_s`` seconds of silence (before the status line)
    stall_next: int = 0
    stall_s: float = 1.0
    seen: list[dict[str, str | None]] = field(default_factory=list)


_RANGE_RE = re.compile(r"^bytes=(\d+)-$")


def _handler(b: Behaviour) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            b.seen.append({"path": self.path, "range": rng, "auth": self.headers.get("Authorization")})
            if b.drop_next > 0:
                b.drop_next -= 1
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if b.stall_next > 0:
                b.stall_next -= 1
                time.sleep(b.stall_s)
            if b.require_token and self.headers.get("Authorization") != f"Bearer {b.require_token}":
                return self._plain(401, b"unauthorised")
            if b.status is not None:
                return self._plain(b.status, b"nope")
            if b.fail_next > 0:
                b.fail_next -= 1
                return self._plain(b.status_once, b"try again")
            body, status, extra = b.content, 200, {}
            m = _RANGE_RE.match(rng or "")
            if m and b.honour_range:
                start = int(m.group(1))
                if b.force_416 > 0 or start >= len(b.content):
                    b.force_416 = max(b.force_416 - 1, 0)
                    return self._plain(416, b"", {"Content-Range": f"bytes */{len(b.content)}"})
                body, status = b.content[start:], 206
                extra["Content-Range"] = f"bytes {start}-{len(b.content) - 1}/{len(b.content)}"
            self.send_response(status)
            if b.no_length:
                self.send_header("Connection", "close")
                self.close_connection = True
            elif b.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(b.fake_length or len(body) + len(b.extra)))
            self.send_header("Accept-Ranges", "bytes")
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            to_send = body + b.extra
            cut = b.cut_after is not None and b.cuts > 0
            if cut:
                b.cuts -= 1
                to_send = body[: b.cut_after]
            try:
                if b.drip is not None:
                    step, pause = b.drip
                    for i in range(0, len(to_send), step):
                        self.wfile.write(to_send[i : i + step])
                        self.wfile.flush()
                        time.sleep(pause)
                elif b.chunked:
                    for i in range(0, len(to_send), b.chunk):
                        piece = to_send[i : i + b.chunk]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    if not cut:
                        self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                else:
                    self.wfile.write(to_send)
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
            if cut:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        def _plain(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    return Handler


class _TLSServer(ThreadingHTTPServer):
    tls: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        sock.settimeout(10)  # the handshake runs in the handler's thread, on first read
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client refusing the certificate (the point of some tests) is no server error


@contextlib.contextmanager
def serve(behaviour: Behaviour, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """Run a server on 127.0.0.1:<ephemeral> (HTTPS with ``tls``); yield its base URL."""
    if tls is None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(behaviour))
    else:
        server = _TLSServer(("127.0.0.1", 0), _handler(behaviour))
        server.tls = tls
    with serving(server, https=tls is not None) as url:
        yield url
