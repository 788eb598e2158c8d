"""A small, honest Open Inference Protocol (KServe V2 REST) peer for tests: a real HTTP(S) server
answering with real onnxruntime sessions, with switches for the faults a cloud can have (slow,
wrong shape, NaN, a lying model name or version, 429, errors, down).

Its tensor codec is written here on purpose rather than borrowed from the device's client, so
the two sides check each other.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import onnxruntime as ort

from tests.helpers.serving import serving

_NP = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_OIP = {np.dtype(v): k for k, v in _NP.items()}


@dataclass
class Faults:
    """What the peer does wrong; change fields while it runs."""

    #: seconds to wait before answering an infer request
    slow_s: float = 0.0
    #: "flat": outputs flattened to one axis (data complete); "short": one value fewer than the shape
    wrong_shape: str | None = None
    #: put a NaN into the first output
    nan: bool = False
    #: name this model / version in answers instead of the real ones
    lie_name: str | None = None
    lie_version: str | None = None
    #: answer the next N infer requests with 429 and ``retry_after`` (None: no header)
    rate_limit_next: int = 0
    retry_after: str | None = "5"
    #: answer every infer request with this status and an OIP error body
    status: int | None = None
    #: drop the connection without answering
    down: bool = False
    #: answer with no outputs at all
    no_outputs: bool = False
    #: hold every infer request until this event is set (then answer as the other switches say)
    hold: threading.Event | None = None


@dataclass
class PeerModel:
    name: str
    version: str
    path: Path
    session: ort.InferenceSession | None = None


@dataclass
class OipPeer:
    """The models it serves (the last version listed for a name is the active one), its faults,
    an optional required header, and what it has seen."""

    models: list[PeerModel]
    faults: Faults = field(default_factory=Faults)
    #: (header, value) every request must carry, else 401
    require_header: tuple[str, str] | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)
    #: infer requests answered with a model's outputs (counted just before the answer is sent)
    completed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for m in self.models:
            m.session = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])

    def find(self, name: str, version: str | None) -> PeerModel | None:
        matches = [m for m in self.models if m.name == name and (version is None or m.version == version)]
        return matches[-1] if matches else None

    @property
    def infer_count(self) -> int:
        with self.lock:
            return sum(1 for s in self.seen if s["method"] == "POST")


def _decode_input(t: dict[str, Any]) -> tuple[str, np.ndarray]:
    dtype = _NP[t["datatype"]]
    arr = np.array(t["data"], dtype=dtype).reshape(t["shape"])
    return t["name"], arr


def _encode_output(name: str, arr: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": _OIP[arr.dtype], "shape": list(arr.shape), "data": arr.ravel().tolist()}


def _parse_path(path: str) -> tuple[str, str | None, str] | None:
    parts = [unquote(p) for p in path.split("?")[0].strip("/").split("/")]
    if len(parts) == 4 and parts[:2] == ["v2", "models"]:
        return parts[2], None, parts[3]
    if len(parts) == 6 and parts[:2] == ["v2", "models"] and parts[3] == "versions":
        return parts[2], parts[4], parts[5]
    return None


def _handler(peer: OipPeer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(doc).encode()  # NaN stays NaN (Python's JSON writes it as a token)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _record(self, body: Any = None) -> None:
            with peer.lock:
                peer.seen.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "body": body,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "client_cert": self._client_cn(),
                    }
                )

        def _client_cn(self) -> str | None:
            conn = self.connection
            if isinstance(conn, ssl.SSLSocket):
                cert = conn.getpeercert()
                for rdn in (cert or {}).get("subject", ()):
                    for key, value in rdn:
                        if key == "commonName":
                            return value
            return None

        def _authorised(self) -> bool:
            if peer.require_header is None:
                return True
            name, value = peer.require_header
            if self.headers.get(name) != value:
                self._send(401, {"error": "unauthorised"})
                return False
            return True

        def do_GET(self) -> None:
            self._record()
            if not self._authorised():
                return
            if self.path.rstrip("/") in ("/v2/health/ready", "/v2/health/live"):
                return self._send(200, {"ready": True})
            parsed = _parse_path(self.path)
            if parsed and parsed[2] == "ready" and peer.find(parsed[0], parsed[1]) is not None:
                return self._send(200, {"name": parsed[0], "ready": True})
            self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            self._record(doc)
            f = peer.faults
            if f.down:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if not self._authorised():
                return
            if f.slow_s:
                time.sleep(f.slow_s)
            if f.hold is not None:
                f.hold.wait(30)
            if f.rate_limit_next > 0:
                f.rate_limit_next -= 1
                return self._send(
                    429,
                    {"error": "rate limited"},
                    {"Retry-After": f.retry_after} if f.retry_after is not None else None,
                )
            if f.status is not None:
                return self._send(f.status, {"error": f"status {f.status} on purpose"})
            parsed = _parse_path(self.path)
            if parsed is None or parsed[2] != "infer":
                return self._send(404, {"error": "not found"})
            model = peer.find(parsed[0], parsed[1])
            if model is None:
                return self._send(404, {"error": f"unknown model {parsed[0]}"})
            try:
                feeds = dict(_decode_input(t) for t in doc["inputs"])
                names = [o.name for o in model.session.get_outputs()]
                results = dict(zip(names, model.session.run(None, feeds), strict=True))
            except Exception as exc:
                return self._send(400, {"error": f"bad request: {exc}"})
            wanted = [o["name"] for o in doc.get("outputs") or []] or names
            outputs = [_encode_output(n, results[n]) for n in wanted if n in results]
            if f.nan and outputs:
                outputs[0]["data"][0] = math.nan
            if f.wrong_shape == "flat":
                for o in outputs:
                    o["shape"] = [len(o["data"])]
            elif f.wrong_shape == "short":
                for o in outputs:
                    o["data"] = o["data"][:-1]
            answer = {
                "model_name": f.lie_name or model.name,
                "model_version": f.lie_version or model.version,
                "id": doc.get("id", ""),
                "outputs": [] if f.no_outputs else outputs,
            }
            with peer.lock:
                peer.completed += 1
            self._send(200, answer)

    return Handler


class _Server(ThreadingHTTPServer):
    """Keeps its connections, so that stopping it cuts the kept-alive ones too (a cloud that is
    down answers nothing, not even on a connection opened before)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        with self.conn_lock:
            self.connections.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self.conn_lock:
            conns, self.connections = list(self.connections), set()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (a timeout) or refused the handshake is part of some tests


class _TLSServer(_Server):
    tls: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.settimeout(10)
        wrapped = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.conn_lock:
            self.connections.discard(sock)
            self.connections.add(wrapped)
        return wrapped, addr


@contextlib.contextmanager
def serve_oip(peer: OipPeer, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """Run ``peer`` on 127.0.0.1:<ephemeral> (HTTPS with ``tls``); yield its base URL."""
    server: _Server
    if tls is None:
        server = _Server(("127.0.0.1", 0), _handler(peer))
    else:
        server = _TLSServer(("127.0.0.1", 0), _handler(peer))
        server.tls = tls
    with serving(server, https=tls is not None, after_close=server.cut_connections) as url:
        yield url
