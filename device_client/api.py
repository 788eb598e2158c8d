"""The local inference endpoint: stdlib ``ThreadingHTTPServer`` in front of :class:`ModelHost`.

In-process callers use :meth:`device_client.runtime.ModelHost.infer` directly. Over HTTP (bound to
127.0.0.1 by default; no FastAPI on the device):

* ``POST /v1/infer`` (when exactly one model is hosted) and ``POST /v1/models/<name>/infer``:

  - JSON ``{"inputs": {"x": [[...]]}}`` -> ``{"model", "version", "outputs": {"y": [[...]]}}``;
    non-finite output values are written as ``null`` (JSON has no NaN);
  - ``Content-Type: application/x-npy``: one ``.npy`` array for a single-input model; the response
    is the ``.npy`` of the first output.

  Every answer names the model version that served it in ``X-Fleet-Model`` and
  ``X-Fleet-Model-Version``, and who answered in ``X-Fleet-Answered-By`` (``edge``, ``cloud`` or
  ``cache``; always ``edge`` for a model without a routing policy) and ``answered_by`` in the
  JSON body, beside ``confidence`` (the edge's, under a policy that reads it, else null; also
  ``X-Fleet-Confidence``); with a policy the body adds ``reason`` and ``cloud_version``.
* ``GET /v1/health``: what serves (version, previous, shadow) per model, and (under a daemon)
  ``rejected_messages``: how many messages on its MQTT topics it refused since it started, per
  reason code (``malformed``, ``bad_signature``, ``replayed``, ...), and ``mqtt``: the link's
  state and last error (:meth:`device_client.mqtt.MqttLink.status`).

Status codes: 400 bad input (unknown/missing input, wrong shape or dtype, malformed JSON or npy),
401 no or a wrong bearer token (when one is configured), 404 unknown path or model, 408 body not
received in time, 411 no Content-Length, 413 body over ``max_body_bytes`` (refused before reading
it), 415 a POST that is neither JSON nor npy, 421 a ``Host`` header that is not this device
(DNS rebinding), 500 the model raised, 503 no model loaded or every connection slot busy. Every
error body is ``{"error": "<message>"}``; no request can crash the server.

Each connection gets ``timeout_s`` to deliver a whole request (line, headers and body) and at most
``max_connections`` are served at once; over the cap a connection gets a 503 at once and no thread.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol

import numpy as np

from .api_server import BoundedServer, DeadlineReader
from .config import API_TOKEN_FILE, DeviceSettings
from .routing.table import Routed, RoutingTable
from .runtime import BadInput, InferenceError, ModelHost, NoModel

log = logging.getLogger(__name__)

NPY_TYPE = "application/x-npy"
JSON_TYPE = "application/json"
DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_TIMEOUT_S = 10.0
#: names that always reach this device (a browser sends the attacker's name under DNS rebinding)
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - compared with, not bound


class ApiConfigError(ValueError):
    """The API's settings cannot be used (an empty token); the daemon does not start."""


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


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without port, brackets or a final dot, lowercased."""
    value = header.strip().lower()
    if value.startswith("["):  # [::1]:8500
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0].rstrip(".") if value.count(":") == 1 else value.rstrip(".")


def load_api_token(settings: DeviceSettings) -> str | None:
    """``FLEET_DEVICE_API_TOKEN``, else the contents of ``<data_dir>/api-token``, else None."""
    if settings.api_token is not None:
        token = settings.api_token.get_secret_value().strip()
        if not token:
            raise ApiConfigError("FLEET_DEVICE_API_TOKEN is empty")
        return token
    path = settings.data_dir / API_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not token:
        raise ApiConfigError(f"{path} is empty: remove it or put the API's bearer token in it")
    return token


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
        allowed_hosts: Iterable[str] = (),
        token: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.hosts: Mapping[str, ModelHost] = {hosts.name: hosts} if isinstance(hosts, ModelHost) else hosts
        self.bind = (host, port)
        self.max_body_bytes = max_body_bytes
        #: more fields for ``GET /v1/health`` (the daemon's rejection counters)
        self.extra_health = extra_health
        #: ``Host`` names answered: loopback names, the bind address unless it is a wildcard, and these
        named = {host_name(h) for h in allowed_hosts if h.strip()}
        if host not in _ANY_ADDRESS:
            named.add(host_name(host))
        self.allowed_hosts = frozenset(LOCAL_HOSTS | named)
        self._token = token.encode() if token else None
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        #: the MQTT link whose ``status()`` is ``mqtt`` in ``GET /v1/health`` (set by the daemon)
        self.mqtt: StatusSource | None = None
        self._server: BoundedServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(
        cls,
        hosts: Mapping[str, ModelHost] | ModelHost,
        settings: DeviceSettings,
        *,
        extra_health: Callable[[], Mapping[str, Any]] | None = None,
    ) -> InferenceServer:
        """The API as ``FLEET_DEVICE_API_*`` configure it (token from the env or the token file)."""
        return cls(
            hosts,
            host=settings.api_host,
            port=settings.api_port,
            max_body_bytes=settings.api_max_body_bytes,
            extra_health=extra_health,
            allowed_hosts=settings.api_allowed_hosts.split(","),
            token=load_api_token(settings),
            max_connections=settings.api_max_connections,
            timeout_s=settings.api_timeout_s,
        )

    @property
    def refused_connections(self) -> int:
        """Connections turned away with a 503 because every slot was busy."""
        return self._server.refused if self._server is not None else 0

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
        server = BoundedServer(self.bind, _make_handler(self), self.max_connections)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fleet-api", daemon=True
        )
        self._thread.start()
        log.info("inference API listening on %s", self.url)

    @property
    def alive(self) -> bool:
        """Whether the serving thread runs (started and not ended): the service watchdog's check."""
        return self._thread is not None and self._thread.is_alive() and self._server is not None

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

    def check_access(self, host_header: str | None, authorization: str | None) -> None:
        """421 for a ``Host`` that is not this device, 401 without the configured bearer token."""
        name = host_name(host_header or "")
        if name not in self.allowed_hosts:
            raise _HttpError(
                HTTPStatus.MISDIRECTED_REQUEST,
                f"Host {(host_header or '')[:100]!r} is not this device "
                "(add it to FLEET_DEVICE_API_ALLOWED_HOSTS to allow it)",
            )
        if self._token is None:
            return
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self._token):
            raise _HttpError(HTTPStatus.UNAUTHORIZED, "a valid bearer token is required")

    def health(self) -> dict[str, Any]:
        models = {name: host.status() for name, host in sorted(self.hosts.items())}
        ok = bool(models) and all(m["version"] for m in models.values())
        doc: dict[str, Any] = {"status": "ok" if ok else "no_model", "models": models}
        if self.extra_health is not None:
            doc.update(self.extra_health())
        if self.mqtt is not None:
            doc["mqtt"] = self.mqtt.status()
        return doc

    #: the routers of the models with a routing policy (the daemon's); None: the edge answers alone
    routing: RoutingTable | None = None

    def infer(self, host: ModelHost, content_type: str, body: bytes) -> tuple[Routed, bool]:
        """Decode, run (through the model's router, if it has a routing policy), and return
        (result, answer-as-npy)."""
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
            if self.routing is not None:
                return self.routing.answer(host, inputs), content_type == NPY_TYPE
            return Routed.edge(host.infer(inputs)), content_type == NPY_TYPE
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

        def setup(self) -> None:
            super().setup()
            # every read of a request is bounded by one deadline: a client that sends half a
            # request, or drips it, loses its connection after timeout_s instead of holding a slot
            self.rfile.close()
            self._reader = DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self._reader)

        def handle_one_request(self) -> None:
            self._reader.deadline = time.monotonic() + api.timeout_s
            super().handle_one_request()

        def _guard(self) -> None:
            """Host and token checks before anything else; a refused request's body stays unread."""
            try:
                api.check_access(self.headers.get("Host"), self.headers.get("Authorization"))
            except _HttpError:
                self.close_connection = True
                raise

        def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
            self.connection.settimeout(api.timeout_s)  # a client that does not read is let go too
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
            extra = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else None
            self._json(status, {"error": message}, extra)

        def do_GET(self) -> None:
            try:
                self._guard()
            except _HttpError as exc:
                self._error(exc.status, exc.message)
                return
            if self.path.split("?")[0] == "/v1/health":
                self._json(200, api.health())
            else:
                self._error(404, f"no route GET {self.path}")

        def do_POST(self) -> None:
            try:
                self._guard()
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
            # JSON or npy only: a browser sends neither cross-origin without a CORS preflight,
            # which this API never grants, so no web page can make it run a model
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype not in (JSON_TYPE, NPY_TYPE):
                self._drain()
                raise _HttpError(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be {JSON_TYPE} or {NPY_TYPE}"
                )
            body = self._body()
            host = api.host_for(name)
            result, as_npy = api.infer(host, ctype, body)
            who = {
                "X-Fleet-Model": result.model,
                "X-Fleet-Model-Version": result.version,
                "X-Fleet-Answered-By": result.answered_by,
            }
            if result.confidence is not None:
                who["X-Fleet-Confidence"] = f"{result.confidence:.6g}"
            if as_npy:
                buf = io.BytesIO()
                np.save(buf, next(iter(result.outputs.values())), allow_pickle=False)
                self._send(200, buf.getvalue(), NPY_TYPE, who)
            else:
                doc: dict[str, Any] = {
                    "model": result.model,
                    "version": result.version,
                    "outputs": {k: _jsonable(v) for k, v in result.outputs.items()},
                    "answered_by": result.answered_by,
                    "confidence": result.confidence,
                }
                if result.reason is not None:
                    doc.update(reason=result.reason, cloud_version=result.cloud_version)
                self._json(200, doc, who)

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
            try:
                body = self.rfile.read(n)
            except TimeoutError:
                body = b""
            if len(body) != n:
                self.close_connection = True
                raise _HttpError(HTTPStatus.REQUEST_TIMEOUT, f"body of {n} bytes not received in time")
            return body

        def _drain(self) -> None:
            try:
                n = self._length()
            except _HttpError:
                return
            try:
                drained = len(self.rfile.read(n)) == n if n <= api.max_body_bytes else False
            except TimeoutError:
                drained = False
            if not drained:
                self.close_connection = True

    return Handler
