"""Settings of the device daemon: one ``DeviceSettings`` read from ``FLEET_DEVICE_*`` variables.

The server side reads ``FLEET_*`` variables; every device-side variable carries the longer prefix
``FLEET_DEVICE_`` (for example ``FLEET_DEVICE_DATA_DIR``, ``FLEET_DEVICE_API_PORT``,
``FLEET_DEVICE_KEEP_PREVIOUS_WARM=false``) so that both can live in one environment without
colliding. Nested values are not used: every field is a flat scalar.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .tlstrust import normalize_fingerprint

SYSTEM_DATA_DIR = Path("/var/lib/fleetota")
#: the local API's bearer token, if this file exists in the data dir (FLEET_DEVICE_API_TOKEN wins)
API_TOKEN_FILE = "api-token"  # noqa: S105 - a file name
LOCAL_DATA_DIR = Path("fleet-device")
GIB = 1024**3
MIB = 1024**2


def default_data_dir() -> Path:
    """``/var/lib/fleetota`` when it exists and is writable, else ``./fleet-device``."""
    if SYSTEM_DATA_DIR.is_dir() and os.access(SYSTEM_DATA_DIR, os.W_OK | os.X_OK):
        return SYSTEM_DATA_DIR
    return LOCAL_DATA_DIR.absolute()


class DeviceSettings(BaseSettings):
    """Everything the device daemon's modules need; defaults suit a small edge box."""

    model_config = SettingsConfigDict(env_prefix="FLEET_DEVICE_", extra="ignore", frozen=True)

    # identity and storage
    device_id: str | None = Field(default=None, description="set at enrollment")
    data_dir: Path = Field(default_factory=default_data_dir)

    # local inference API (api.py)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8500, ge=0, le=65535)
    api_max_body_bytes: int = Field(default=16 * MIB, ge=1024)
    #: more ``Host`` names the API answers besides localhost, 127.0.0.1, ::1 and ``api_host``
    #: (comma-separated); any other name is a 421, which defeats DNS rebinding from a browser
    api_allowed_hosts: str = ""
    #: bearer token every API request must carry; unset: ``<data_dir>/api-token`` if it exists
    api_token: SecretStr | None = None
    #: connections served at once (a thread each); more get a 503 at once
    api_max_connections: int = Field(default=32, ge=1, le=4096)
    #: time a connection has to deliver each whole request (line, headers, body), and to read an answer
    api_timeout_s: float = Field(default=10.0, gt=0)

    # onnxruntime host (runtime/)
    intra_op_threads: int = Field(default=1, ge=1)
    warmup_runs: int = Field(default=3, ge=0)
    #: nice increment of the thread that loads, validates and warms a model (0: same priority)
    load_nice: int = Field(default=10, ge=0, le=19)
    #: run that thread under Linux SCHED_IDLE (CPU only when no normal thread wants it); load_nice
    #: applies where SCHED_IDLE is unavailable or off
    load_idle: bool = True
    #: keep exactly one previous model loaded so that rollback is a reference flip
    keep_previous_warm: bool = True
    shadow_sample_rate: float = Field(default=0.1, ge=0, le=1)
    shadow_queue_size: int = Field(default=64, ge=1)
    shadow_rtol: float = Field(default=1e-3, ge=0)
    shadow_atol: float = Field(default=1e-4, ge=0)

    # health (health.py)
    health_window_s: float = Field(default=10.0, gt=0)
    #: latencies kept for a probation period's percentiles (reservoir sample beyond this)
    probation_latency_samples: int = Field(default=4096, ge=16)

    # downloads (fetcher/)
    max_bundle_bytes: int = Field(default=GIB, ge=1)
    max_metadata_bytes: int = Field(default=16 * MIB, ge=1024)
    download_deadline_s: float = Field(default=600.0, gt=0)
    metadata_deadline_s: float = Field(default=60.0, gt=0)
    download_connect_timeout_s: float = Field(default=10.0, gt=0)
    #: longest silence tolerated between two received chunks
    download_read_timeout_s: float = Field(default=30.0, gt=0)
    download_chunk_bytes: int = Field(default=256 * 1024, ge=1024)
    download_attempts: int = Field(default=3, ge=1)
    #: bytes per second a bundle download may use (0: unlimited); keeps the uplink usable
    download_rate_limit_bps: int = Field(default=0, ge=0)
    #: free space that must remain on the data directory's file system after download + extraction
    min_free_bytes: int = Field(default=64 * MIB, ge=0)
    device_token: SecretStr | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_cert: Path | None = None
    #: SHA-256 of the server's TLS certificate, replacing the one pinned at enrollment (after the
    #: server's certificate was renewed); requests to the server accept only that certificate
    server_fingerprint: str | None = None

    # hybrid edge/cloud routing (routing/)
    #: base URL of the fleet's cloud tier (``fleet cloud serve``) for policies naming the ``fleet``
    #: endpoint; overrides the one handed out at enrollment. ``https://``, or ``http://`` to this
    #: machine only (the device token goes with every request). Neither: such a policy's
    #: escalations fall back to the cache and the edge, counted as ``cloud_failed``
    cloud_url: str | None = None

    #: the int8 CPU flags reported in the hardware facts (comma-separated, e.g. ``avx2,avx_vnni``;
    #: empty: none) instead of those read from /proc/cpuinfo
    cpu_flags: str | None = None

    # update state machine (state.py)
    #: a crash during verify/install restarts it at most this many times, then the update fails
    max_install_attempts: int = Field(default=2, ge=1)
    #: how often a running probation is evaluated
    probation_tick_s: float = Field(default=1.0, gt=0)

    # running under systemd (sdnotify.py, daemon/lifecycle.py)
    #: a worker step running longer than this stops the watchdog pings (systemd restarts the
    #: daemon); longer than a slow download's worst case (download_deadline_s x download_attempts)
    stall_timeout_s: float = Field(default=2400.0, gt=0)
    #: for tests only: the worker hangs this many seconds after start (None: never)
    test_hang_worker_after_s: float | None = Field(default=None, ge=0)
    #: enrollment token file for a first boot (``fleet device run --token-file``): read once when the
    #: data directory has no identity yet, deleted after a successful enrollment
    token_file: Path | None = None
    #: control server URL for that first-boot enrollment
    enroll_server: str | None = None
    #: allow that server URL to be plain http:// (a lab only)
    enroll_insecure_http: bool = False

    # MQTT reconnects (mqtt.py)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)

    @field_validator("cloud_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check(self) -> DeviceSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if self.server_fingerprint is not None:
            normalize_fingerprint(self.server_fingerprint)
        if self.cloud_url is not None:
            check_cloud_url(self.cloud_url)
        return self


def check_cloud_url(url: str) -> None:
    """ValueError unless ``url`` is an ``https://`` URL, or ``http://`` to a loopback host."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"cloud_url {url!r} is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host or parts.query or parts.fragment:
        raise ValueError(f"cloud_url {url!r} must be an http(s) base URL with a host")
    if scheme == "http" and not _loopback(host):
        raise ValueError(
            f"cloud_url {url!r}: plain http:// only to this machine (the device token would cross "
            "the network in clear); use https://"
        )


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
