"""Running the cloud tier: :func:`run_cloud` is ``fleet cloud serve`` (a process of its own; several
may run behind a load balancer, each with its own data directory), :class:`CloudThread` the same
under uvicorn in a background thread (tests, demos)."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from server.cloud.app import create_cloud_app
from server.cloud.service import CloudService
from server.cloud.tls import uvicorn_tls_options
from server.config import Settings
from server.runner import InsecureBind

log = logging.getLogger(__name__)


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_cloud_bind(settings: Settings) -> None:
    """Refuse to listen beyond loopback over plain HTTP (device tokens would cross the network in
    clear) unless FLEET_ALLOW_INSECURE_BIND is set."""
    if _loopback(settings.cloud_host) or settings.cloud_tls_cert is not None or settings.allow_insecure_bind:
        return
    raise InsecureBind(
        f"refusing to serve plain HTTP on {settings.cloud_host}: set FLEET_CLOUD_TLS_CERT and "
        "FLEET_CLOUD_TLS_KEY (or terminate TLS in front and set FLEET_ALLOW_INSECURE_BIND=1)"
    )


def uvicorn_config(settings: Settings, app: FastAPI, log_level: str = "info") -> uvicorn.Config:
    allow = settings.forwarded_allow_ips.strip()
    return uvicorn.Config(
        app,
        host=settings.cloud_host,
        port=settings.cloud_port,
        log_level=log_level,
        lifespan="on",
        proxy_headers=bool(allow),
        forwarded_allow_ips=allow or None,
        **uvicorn_tls_options(settings),
    )


def run_cloud(settings: Settings) -> None:
    """Serve the cloud tier until SIGINT or SIGTERM."""
    check_cloud_bind(settings)
    service = CloudService(settings)
    scheme = "https" if settings.cloud_tls_cert is not None else "http"
    log.info(
        "cloud tier on %s://%s:%d serving %s", scheme, settings.cloud_host, settings.cloud_port,
        ", ".join(service.model_names) or "nothing",
    )  # fmt: skip
    uvicorn.Server(uvicorn_config(settings, create_cloud_app(service))).run()


class CloudThread:
    """The cloud tier under uvicorn in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = CloudService(settings)
        self.app = create_cloud_app(self.service)
        self.server = uvicorn.Server(uvicorn_config(settings, self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="fleet-cloud", daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.cloud_tls_cert is not None else "http"
        return f"{scheme}://{self.settings.cloud_host}:{self.settings.cloud_port}"

    def start(self, timeout: float = 30.0) -> CloudThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the cloud tier did not start")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every configured model serves (RuntimeError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.service.readiness()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cloud tier is not ready: {self.service.readiness()[1]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self) -> CloudThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
