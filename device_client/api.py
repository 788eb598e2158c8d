"""The local inference endpoint: stdlib ``ThreadingHTTPServer`` in front of :class:`ModelHost`.

In-process callers use :meth:`device_client.runtime.ModelHost.infer` directly. Over HTTP (bound to
127.0.0.1 by default; no FastAPI on the device):

* ``POST /v1/infer`` (when exactly one model is hosted) and ``POST /v1/models/<name>/infer``:

  - JSON ``{"inputs": {"x": [[...]]}}`` -> ``{"model", "version", "outputs": {"y": [[...]]}}``;
    non-finite output values are written as ``null`` (JSON has no NaN);
  - ``Content-Type: application/x-npy``: one ``.npy`` array for a single-input model; the response
    is the ``.npy`` of the first output.

  Every answer names who answered in ``X-Fleet-Model`` and ``X-Fleet-Model-Version``.
* ``GET /v1/health``: what serves (version, previous, shadow) per model, and (under a daemon)
  ``rejected_messages``: how many messages on its MQTT topics it refused since it started, per
  reason code (``malformed``, ``bad_signature``, ``replayed``, ...), and ``mqtt``: the link's
  state and last error (:meth:`device_client.mqtt.MqttLink.status`).

Status codes: 400 bad input (unknown/missing input, wrong shape or dtype, malformed JSON or npy),
404 unknown path or model, 411 no Content-Length, 413 body over ``max_body_bytes`` (refused before
reading it), 500 the model raised, 503 no model loaded. Every error body is
``{"error": "<message>"}``; no request can crash the server.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import numpy as np

from .runtime import BadInput, InferenceError, InferenceResult, ModelHost, NoModel

log = logging.getLogger(__name__)

NPY_TYPE = "application/x-npy"
JSON_TYPE = "application/json"
DEFAULT_MAX_BODY = 16 * 1024 * 1024


class StatusSource(Protocol):
    def status(self) -> dict[str, Any]: ...


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _jsonable(arr: np.ndarray) -> Any:
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        obj = arr.astype(object)
        obj[~np.isfinite(arr)] = None
        return obj.tolist()
    return arr.tolist()


class InferenceServer:
    """HTTP front of one or several :class:`ModelHost` objects (``hosts`` may change at run time)."""

    def __init__(
        self,
        hosts: Mapping[str, ModelHost] | ModelHost,
        *,
        host: str = "127.0.0.1",
        port: int = 8500,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        extra_health: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.hosts: Mapping[str, ModelHost] = {hosts.name: hosts} if isinstance(hosts, ModelHost) else hosts
        self.bind = (host, port)
        self.max_body_bytes = max_body_bytes
        #: more fields for ``GET /v1/health`` (the daemon's rejection counters)
        self.extra_health = extra_health
        #: the MQTT link whose ``status()`` is ``mqtt`` in ``GET /v1/health`` (set by the daemon)
        self.mqtt: StatusSource | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.bind[0]}:{self.port}"

    def start(self) -> None:
        """Bind (port 0 picks a free port) and serve in a background thread."""
        if self._server is not None:
            return
        server = ThreadingHTTPServer(self.bind, _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fleet-api", daemon=True
        )
        self._thread.start()
        log.info("inference API listening on %s", self.url)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ request logic

    def host_for(self, name: str | None) -> ModelHost:
        if name is None:
            if len(self.hosts) != 1:
                raise _HttpError(
                    400, f"{len(self.hosts)} models are hosted; use /v1/models/<name>/infer"
                )
            return next(iter(self.hosts.values()))
        host = self.hosts.get(name)
        if host is None:
            raise _HttpError(404, f"no model {name!r} is hosted")
        return host

    def health(self) -> dict[str, Any]:
        models = {name: host.status() for name, host in sorted(self.hosts.items())}
        ok = bool(models) and all(m["version"] for m in models.values())
        doc: dict[str, Any] = {"status": "ok" if ok else "no_model", "models": models}
        if self.extra_health is not None:
            doc.update(self.extra_health())
        if self.mqtt is not None:
            doc["mqtt"] = self.mqtt.status()
        return doc

    def infer(self, host: ModelHost, content_type: str, body: bytes) -> tuple[InferenceResult, bool]:
        """Decode, run, and return (result, answer-as-npy)."""
        model = host.serving
        if model is None:
            raise _HttpError(503, f"no model {host.name!r} is loaded")
        if content_type == NPY_TYPE:
            if len(model.input_names) != 1:
                raise _HttpError(400, f"{NPY_TYPE} needs a single-input model; use JSON")
            try:
                arr = np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise _HttpError(400, f"malformed .npy body: {exc}") from None
            inputs = {model.input_names[0]: arr}
        else:
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _HttpError(400, f"malformed JSON: {exc}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
                raise _HttpError(400, 'body must be {"inputs": {"<name>": [...]}}')
            inputs = {}
            for name, value in doc["inputs"].items():
                try:
                    spec = model.input_spec(name)
                except KeyError:
                    raise _HttpError(
                        400, f"unknown input {name!r}; expected {list(model.input_names)}"
                    ) from None
                try:
                    inputs[name] = np.asarray(value, dtype=np.dtype(spec.dtype))
                except (ValueError, TypeError) as exc:
                    raise _HttpError(400, f"input {name!r} is not a {spec.dtype} array: {exc}") from None
        try:
            return host.infer(inputs), content_type == NPY_TYPE
        except BadInput as exc:
            raise _HttpError(400, str(exc)) from None
        except NoModel as exc:
            raise _HttpError(503, str(exc)) from None
        except InferenceError as exc:
            raise _HttpError(500, f"inference failed: {exc}") from None


def _make_handler(api: InferenceServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fleetota-device"
        #: headers and body go out in two writes; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), JSON_TYPE, headers or {})

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message})

        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/v1/health":
                self._json(200, api.health())
            else:
                self._error(404, f"no route GET {self.path}")

        def do_POST(self) -> None:
            try:
                self._post()
            except _HttpError as exc:
                self._error(exc.status, exc.message)
            except Exception as exc:  # never let one request take the server down
                log.exception("unexpected error serving %s", self.path)
                self.close_connection = True
                self._error(500, f"internal error: {exc.__class__.__name__}")

        def _post(self) -> None:
            path = self.path.split("?")[0]
            parts = path.strip("/").split("/")
            if path == "/v1/infer":
                name = None
            elif len(parts) == 4 and parts[:2] == ["v1", "models"] and parts[3] == "infer":
                name = parts[2]
            else:
                self._drain()
                raise _HttpError(404, f"no route POST {self.path}")
            body = self._body()
            host = api.host_for(name)
            ctype = (self.headers.get("Content-Type") or JSON_TYPE).split(";")[0].strip().lower()
            result, as_npy = api.infer(host, ctype, body)
            who = {"X-Fleet-Model": result.model, "X-Fleet-Model-Version": result.version}
            if as_npy:
                buf = io.BytesIO()
                np.save(buf, next(iter(result.outputs.values())), allow_pickle=False)
                self._send(200, buf.getvalue(), NPY_TYPE, who)
            else:
                outputs = {k: _jsonable(v) for k, v in result.outputs.items()}
                self._json(200, {"model": result.model, "version": result.version, "outputs": outputs}, who)

        def _length(self) -> int:
            raw = self.headers.get("Content-Length")
            if raw is None:
                self.close_connection = True
                raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            try:
                n = int(raw)
            except ValueError:
                self.close_connection = True
                raise _HttpError(400, "invalid Content-Length") from None
            if n < 0:
                self.close_connection = True
                raise _HttpError(400, "invalid Content-Length")
            return n

        def _body(self) -> bytes:
            n = self._length()
            if n > api.max_body_bytes:
                self.close_connection = True  # the unread body must not be parsed as a request
                raise _HttpError(413, f"body of {n} bytes exceeds the limit of {api.max_body_bytes}")
            return self.rfile.read(n)

        def _drain(self) -> None:
            try:
                n = self._length()
            except _HttpError:
                return
            if n <= api.max_body_bytes:
                self.rfile.read(n)
            else:
                self.close_connection = True

    return Handler
