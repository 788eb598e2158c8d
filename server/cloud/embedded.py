"""The embedded cloud tier: ``fleet cloud serve`` as a supervised child of ``fleet server run``.

:class:`CloudChild` is the process: its environment names this server (URL, database, TUF root)
and carries a ``cloud`` admin token minted for it at each start (short-lived, revoked when it
stops, never logged). :class:`CloudSupervisor` starts it once the API listens, restarts it with a
back-off when it dies, restarts it before its token expires, and probes its health for ``/readyz``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from server.config import Settings
from server.procs import Backoff, death_signal_preexec

log = logging.getLogger(__name__)

#: lifetime of the token minted for each start; the child restarts at ``RENEW_AT`` of it
TOKEN_TTL_S = 86400
RENEW_AT = 0.9
#: how often the supervisor asks the child ``/v2/health/ready``
PROBE_INTERVAL_S = 1.0

#: ``mint(ttl_s) -> (token_id, token)`` and ``revoke(token_id)``: the server's token store
Mint = Callable[[int], tuple[str, str]]
Revoke = Callable[[str], None]


class CloudStartError(RuntimeError):
    """The cloud child exited, or did not answer ``/v2/health/live``, while starting."""


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104


def _url(scheme: str, host: str, port: int) -> str:
    host = _connect_host(host)
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def embedded_cloud_url(settings: Settings, public: bool = False) -> str:
    """The URL the embedded tier serves at (``FLEET_CLOUD_HOST``/``_PORT``, HTTPS with a
    ``FLEET_CLOUD_TLS_CERT``); ``public``: on the host of ``FLEET_PUBLIC_URL``, where devices
    reach this server."""
    scheme = "https" if settings.cloud_tls_cert is not None else "http"
    host = (urlsplit(settings.public_url).hostname or settings.cloud_host) if public else settings.cloud_host
    return _url(scheme, host, settings.cloud_port)


def server_url_for_child(settings: Settings) -> str:
    """Where the child reads the image repository: ``FLEET_CLOUD_SERVER_URL``, else this server
    over loopback (plain HTTP), else (HTTPS, whose certificate names the public host) its public URL."""
    if settings.cloud_server_url:
        return settings.cloud_server_url
    if settings.tls_cert is not None:
        return settings.public_url
    return _url("http", settings.host, settings.port)


def child_environment(settings: Settings, token: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the server's, with the settings it resolved spelled out (paths,
    database, the cloud bind), the token and the server URL. Its TUF root: ``FLEET_CLOUD_TUF_ROOT``
    when set, else the newest root of ``FLEET_REPO_DIR``, this server's repository."""
    env = dict(os.environ if base is None else base)
    env.update(
        FLEET_DATA_DIR=str(settings.data_dir),
        FLEET_DATABASE_URL=settings.database_url,
        FLEET_KEY_DIR=str(settings.key_dir),
        FLEET_REPO_DIR=str(settings.repo_dir),
        FLEET_CLOUD_HOST=settings.cloud_host,
        FLEET_CLOUD_PORT=str(settings.cloud_port),
        FLEET_CLOUD_SERVER_URL=server_url_for_child(settings),
        FLEET_CLOUD_TOKEN=token,
        FLEET_PUBLIC_URL=settings.public_url,
    )
    if settings.cloud_tuf_root is not None:
        env["FLEET_CLOUD_TUF_ROOT"] = str(settings.cloud_tuf_root)
    return env


@dataclass(frozen=True)
class CloudState:
    """What the supervisor last learnt of the child (``/readyz`` shows it)."""

    running: bool = False
    live: bool = False
    ready: bool = False
    detail: str = "not started yet"
    pid: int | None = None

    def as_check(self, url: str, restarts: int) -> dict[str, Any]:
        return {
            "ok": self.running and self.live,
            "ready": self.ready,
            "detail": self.detail,
            "pid": self.pid,
            "url": url,
            "restarts": restarts,
        }


class CloudChild:
    """One ``fleet cloud serve`` process (``python -m server.cli cloud serve``), in a process
    group of its own, sent SIGTERM by the kernel if the thread that started it dies."""

    def __init__(self, settings: Settings, mint: Mint, revoke: Revoke) -> None:
        self.settings = settings
        self.mint = mint
        self.revoke = revoke
        self.url = embedded_cloud_url(settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self.token_id: str | None = None
        self.token_renew_at = 0.0
        # a probe of our own child on loopback: its certificate is not what is checked here
        self._probe_verify = settings.cloud_tls_cert is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, cancel: threading.Event, timeout: float = 60.0) -> None:
        """Mint a token, start the process, and return once it answers ``/v2/health/live``;
        :class:`CloudStartError` if it exits or stays silent for ``timeout``."""
        self.stop()
        token_id, token = self.mint(TOKEN_TTL_S)
        self.token_id = token_id
        self.token_renew_at = time.monotonic() + TOKEN_TTL_S * RENEW_AT
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "cloud", "serve"],
            env=child_environment(self.settings, token),
            stdin=subprocess.DEVNULL,
            preexec_fn=death_signal_preexec(signal.SIGTERM),
            process_group=0,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not cancel.is_set():
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                self._revoke()
                raise CloudStartError(f"it exited while starting (code {code})")
            if self.probe().live:
                return
            cancel.wait(0.2)
        self.stop()
        if not cancel.is_set():
            raise CloudStartError(f"it did not answer {self.url}/v2/health/live within {timeout:.0f} s")

    def probe(self) -> CloudState:
        """Ask the child ``/v2/health/ready`` (200 ready, 503 live but not ready)."""
        if not self.running:
            return CloudState(detail="not running", pid=None)
        try:
            answer = httpx.get(f"{self.url}/v2/health/ready", timeout=2.0, verify=self._probe_verify)
        except httpx.HTTPError as exc:
            return CloudState(running=True, detail=f"does not answer: {type(exc).__name__}", pid=self.pid)
        if answer.status_code == 200:
            return CloudState(running=True, live=True, ready=True, detail="ready", pid=self.pid)
        try:
            detail = str(answer.json().get("error", answer.status_code))
        except ValueError:
            detail = f"HTTP {answer.status_code}"
        return CloudState(running=True, live=True, detail=detail, pid=self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (uvicorn answers what is queued), SIGKILL after ``timeout``; revoke its token."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._revoke()

    def _revoke(self) -> None:
        if self.token_id is None:
            return
        token_id, self.token_id = self.token_id, None
        try:
            self.revoke(token_id)
        except Exception:  # it expires on its own
            log.exception("revoking the embedded cloud tier's token %s failed", token_id)


def port_taken(host: str, port: int) -> bool:
    try:
        with socket.create_connection((_connect_host(host), port), timeout=0.2):
            return True
    except OSError:
        return False


class CloudSupervisor:
    """Starts the :class:`CloudChild` once ``api_started()`` is true, restarts it when it exits
    (1 s, doubling up to 30 s while it keeps dying young) or its token is due for renewal, and
    keeps :attr:`state` current. Everything happens on the supervisor's thread, which lives
    until :meth:`stop` (the child's death signal follows the thread that started it)."""

    def __init__(
        self, child: CloudChild, api_started: Callable[[], bool], backoff: Backoff | None = None
    ) -> None:
        self.child = child
        self.api_started = api_started
        self.backoff = backoff or Backoff()
        self.restarts = 0
        self.state = CloudState()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> dict[str, Any]:
        """The ``cloud`` entry of ``/readyz``."""
        return self.state.as_check(self.child.url, self.restarts)

    def start(self) -> CloudSupervisor:
        self._thread = threading.Thread(target=self._run, name="cloud-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.child.stop()  # if the thread did not get to it
        self.state = CloudState(detail="stopped")

    def _run(self) -> None:
        try:
            self._supervise()
        finally:
            self.child.stop()

    def _launch(self) -> bool:
        try:
            self.child.start(self._stop)
        except CloudStartError as exc:
            log.error("embedded cloud tier did not start: %s", exc)
            self.state = CloudState(detail=f"did not start: {exc}")
            return False
        except Exception as exc:  # e.g. the database refused the token: try again later
            log.exception("embedded cloud tier did not start")
            self.state = CloudState(detail=f"did not start: {type(exc).__name__}")
            return False
        self.state = self.child.probe()
        return self.child.running

    def _supervise(self) -> None:
        while not self.api_started():
            if self._stop.wait(0.1):
                return
        started = time.monotonic()
        if self._launch():
            log.info("embedded cloud tier serving at %s (pid %s)", self.child.url, self.child.pid)
        probed = time.monotonic()
        while not self._stop.wait(0.2):
            if self.child.running:
                if time.monotonic() >= self.child.token_renew_at:
                    log.info("renewing the embedded cloud tier's token: restarting it")
                    started = time.monotonic()
                    self._launch()
                elif time.monotonic() - probed >= PROBE_INTERVAL_S:
                    self.state, probed = self.child.probe(), time.monotonic()
                continue
            proc = self.child.proc
            if proc is not None:  # None: the last start failed (and said why)
                log.error("embedded cloud tier exited (code %s)", proc.returncode)
                self.child.stop()
            self.state = CloudState(detail="not running: restarting")
            delay = self.backoff.delay(time.monotonic() - started)
            log.warning("restarting the embedded cloud tier in %.0f s", delay)
            if self._stop.wait(delay):
                return
            started = time.monotonic()
            if self._launch():
                self.restarts += 1
                log.warning("embedded cloud tier restarted (pid %s)", self.child.pid)
