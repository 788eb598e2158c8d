"""The server's one Settings object (environment variables with the ``FLEET_`` prefix)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: longest ``mqtt_server_name``: its connections' certificate CNs (server/mqtt/identity.py) must
#: stay within the 64 characters a CN may have
SERVER_NAME_MAX = 40
SERVER_NAME_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9-]{{0,{SERVER_NAME_MAX - 1}}}"


class Settings(BaseSettings):
    """Control-server settings. Every path defaults to a place under ``data_dir``."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    data_dir: Path = Path("fleet-data")
    #: SQLAlchemy URL; defaults to SQLite in ``data_dir/fleet.db`` (the embedded default)
    database_url: str = ""
    #: private keys (fleet CA, director, TUF roles), each file 0600
    key_dir: Path = Path()
    #: the TUF image repository: ``metadata/`` and ``targets/`` (any static server or CDN can serve it)
    repo_dir: Path = Path()
    #: generated broker configuration (mosquitto.conf, certificates, ACL)
    broker_dir: Path = Path()

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: base URL devices use to reach this server (enrollment, TUF metadata and targets)
    public_url: str = ""
    #: where devices download bundles from: a static server or CDN serving ``repo_dir/targets``
    #: as is (consistent-snapshot names, Range requests); empty = this server's ``/tuf/targets/``.
    #: Handed out at enrollment, so it applies to devices enrolled after it is set
    targets_url: str = ""
    #: base URL devices reach the cloud inference tier at (``fleet cloud serve``), for routing
    #: policies naming the ``fleet`` endpoint; handed out at enrollment (empty: none). A device's
    #: ``FLEET_DEVICE_CLOUD_URL`` overrides it
    cloud_public_url: str = ""
    #: refuse to bind a non-loopback address with development defaults unless this is set
    allow_insecure_bind: bool = False
    #: serve the API over HTTPS itself (uvicorn ``ssl_certfile``/``ssl_keyfile``): a PEM certificate
    #: (chain) and its key. Both or neither; empty = plain HTTP (terminate TLS in a proxy in front)
    tls_cert: Path | None = None
    tls_key: Path | None = None

    #: external broker, e.g. ``mqtts://broker.example:8883``; empty = start Mosquitto as a child
    mqtt_url: str = ""
    #: port of the embedded Mosquitto (mTLS listener)
    mqtt_port: int = Field(default=8883, ge=0, le=65535)
    #: host name devices use for the broker; defaults to the host of ``mqtt_url`` or ``host``
    mqtt_public_host: str = ""
    mosquitto_bin: str = "mosquitto"
    #: connect the MQTT bridge (consume reports/health/presence, publish desired states)
    mqtt_enabled: bool = True
    #: consume through ``$share/fleet-server/...`` so replicas split the load. Default: on with an
    #: external broker (``FLEET_MQTT_URL``), off with the embedded one (a single server: Mosquitto
    #: 2.0 does not restore shared subscriptions of a persistent session after a broker restart,
    #: plain ones it does, so a lone server loses nothing across a broker restart)
    mqtt_shared_subscriptions: bool | None = None
    #: the CA the broker's certificate must chain to; default: the fleet CA `fleet broker config` wrote
    mqtt_ca_file: Path | None = None
    #: this replica's name in its MQTT identities (``fleet_server.NAME``, ``fleet_server.NAME.pub``,
    #: server/mqtt/identity.py), which the broker ACL must list; default: HOST-PORT
    mqtt_server_name: str = Field(default="", pattern=rf"^({SERVER_NAME_PATTERN})?$")
    #: batch size and maximum delay of the ingest writer
    ingest_batch_max: int = Field(default=2000, ge=1)
    ingest_batch_delay_s: float = Field(default=0.2, gt=0)
    #: consume device traffic in this many worker processes of their own (0: a thread of the
    #: server process); see server/mqtt/workers.py. More than one needs shared subscriptions.
    ingest_processes: int = Field(default=0, ge=0, le=64)

    #: after start-up, collect once, freeze what is alive and raise the young-generation threshold
    #: (server/gctune.py) in the server process and each ingest process
    gc_tuning: bool = True

    #: run the rollout engine in this process, ticking every ``rollout_tick_s``
    rollout_engine: bool = True
    rollout_tick_s: float = Field(default=1.0, gt=0)

    #: lifetime of a signed DesiredState; re-signed when a device returns and it expires within
    #: ``desired_resign_before_s``
    desired_ttl_s: int = Field(default=7 * 86400, ge=60)
    desired_resign_before_s: int = Field(default=86400, ge=0)

    #: raw health windows older than this are folded into hourly rollups (``health_rollups``) by a
    #: job running every ``health_rollup_interval_s``; rollups older than the last setting are deleted
    health_raw_retention_s: int = Field(default=86400, ge=60)
    health_rollup_bucket_s: int = Field(default=3600, ge=60)
    health_rollup_interval_s: float = Field(default=300.0, gt=0)
    health_rollup_retention_s: int = Field(default=90 * 86400, ge=3600)
    #: what a health window may claim (server/health/plausibility.py): requests per second of its
    #: window_s, its length, and how far its stamp may be from the server's clock
    health_max_rps: float = Field(default=100_000.0, gt=0)
    health_max_window_s: float = Field(default=3600.0, gt=0)
    health_max_clock_skew_s: float = Field(default=300.0, gt=0)

    #: request body caps by route, enforced before a byte is read (server/http/bodylimit.py):
    #: model pushes; bulk enrollment (1,000 CSRs, even RSA-8192 ones, fit); a signed targets PUT;
    #: every other body (JSON: enrollment, rollouts, tags, tokens, ...)
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    max_bulk_enroll_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_signed_metadata_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: token buckets per client address for the anonymous endpoints (server/http/ratelimit.py):
    #: ``POST /api/v1/enroll`` and ``GET /api/v1/pki/crl.pem``; a rate of 0 turns a limit off
    enroll_rate_per_s: float = Field(default=2.0, ge=0)
    enroll_rate_burst: int = Field(default=60, ge=1)
    crl_rate_per_s: float = Field(default=1.0, ge=0)
    crl_rate_burst: int = Field(default=30, ge=1)
    #: proxies whose ``X-Forwarded-For`` names the client (uvicorn's ``forwarded_allow_ips``):
    #: comma-separated addresses or networks, ``*`` for any, empty for none (the peer address counts)
    forwarded_allow_ips: str = "127.0.0.1,::1"
    enroll_token_ttl_s: int = Field(default=7 * 86400, ge=60)
    device_cert_days: int = Field(default=365, ge=1)

    root_expiry_s: int = Field(default=365 * 86400, ge=3600)
    targets_expiry_s: int = Field(default=90 * 86400, ge=3600)
    snapshot_expiry_s: int = Field(default=7 * 86400, ge=600)
    timestamp_expiry_s: int = Field(default=86400, ge=120)
    #: how often the server checks whether online metadata needs re-signing
    metadata_refresh_interval_s: float = Field(default=60.0, gt=0)

    log_level: str = "INFO"

    # -- the cloud inference tier, `fleet cloud serve` (server/cloud/; README "Cloud tier") ----------
    #: `fleet server run` starts one as a supervised child (server/cloud/embedded.py)
    cloud_embedded: bool = True
    cloud_host: str = "127.0.0.1"
    cloud_port: int = Field(default=8600, ge=0, le=65535)
    #: what it serves: model names (each one's highest release) and ``name@version`` pins (that
    #: version too), comma-separated; only targets of ``cloud_variant`` count
    cloud_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cloud_variant: str = "default"
    #: its installed bundles and TUF metadata; default ``data_dir/cloud/HOST-PORT`` (one per replica)
    cloud_data_dir: Path | None = None
    #: the server it reads the image repository from; default ``public_url`` (bundles from
    #: ``targets_url`` when set)
    cloud_server_url: str = ""
    #: the CA that the server's HTTPS certificate chains to (default: the system's CAs)
    cloud_server_ca: Path | None = None
    #: its identity towards the server: an admin token of role ``cloud`` (`fleet admin token create
    #: --role cloud`), sent when downloading bundles
    cloud_token: SecretStr | None = None
    #: the TUF root it trusts at first start; default the newest root in ``repo_dir`` (same host)
    cloud_tuf_root: Path | None = None
    #: how often it refreshes the repository (new versions in, revoked ones out)
    cloud_refresh_s: float = Field(default=30.0, gt=0)
    #: serve HTTPS with this certificate and key; devices may then authenticate with their fleet
    #: certificate (verified against ``cloud_client_ca``, default the fleet CA in ``key_dir``)
    cloud_tls_cert: Path | None = None
    cloud_tls_key: Path | None = None
    cloud_client_ca: Path | None = None
    #: how long a caller's authentication (token or certificate) is reused before the database is
    #: asked again; a decommission takes effect within this
    cloud_auth_cache_s: float = Field(default=5.0, ge=0)
    #: per-device token bucket of inference requests (429 with Retry-After past it); 0 = no limit
    cloud_rate_per_s: float = Field(default=50.0, ge=0)
    cloud_rate_burst: int = Field(default=100, ge=1)
    cloud_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    #: requests admitted and not yet answered, over all models (503 past it)
    cloud_max_queue: int = Field(default=256, ge=1)
    #: micro-batching: how long the first request of a batch waits for company, and the largest batch
    cloud_batch_window_ms: float = Field(default=2.0, ge=0, le=10_000)
    cloud_max_batch: int = Field(default=32, ge=1, le=4096)
    cloud_intra_op_threads: int = Field(default=1, ge=1, le=256)
    #: ceiling on the hard examples all cloud replicas keep together (oldest dropped first), over
    #: each policy's ``collect.max_bytes``; only requests a signed policy asked for; 0: keep none
    cloud_examples_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)

    @field_validator("cloud_models", mode="before")
    @classmethod
    def _cloud_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("host")
    @classmethod
    def _bind_host(cls, value: str) -> str:
        # uvicorn (and Mosquitto) bind "" to every interface, and public_url would be http://:8080:
        # an empty FLEET_HOST must not pass for loopback and slip past the insecure-bind check
        value = value.strip()
        if not value:
            raise ValueError(
                "must not be empty (that would listen on all interfaces): give the address to listen "
                "on, e.g. 127.0.0.1 (this host only, the default) or 0.0.0.0 (all interfaces)"
            )
        return value

    @field_validator("targets_url", "cloud_public_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        data = self.data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{(data / 'fleet.db').as_posix()}"
        if self.key_dir == Path():
            self.key_dir = data / "keys"
        if self.repo_dir == Path():
            self.repo_dir = data / "repository"
        if self.broker_dir == Path():
            self.broker_dir = data / "broker"
        self.mqtt_ca_file = self.mqtt_ca_file or self.broker_dir / "ca.crt"
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("FLEET_TLS_CERT and FLEET_TLS_KEY go together: set both or neither")
        if (self.cloud_tls_cert is None) != (self.cloud_tls_key is None):
            raise ValueError("FLEET_CLOUD_TLS_CERT and FLEET_CLOUD_TLS_KEY go together: set both or neither")
        if not self.public_url:
            host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
            scheme = "https" if self.tls_cert is not None else "http"
            self.public_url = f"{scheme}://{host}:{self.port}"
        self.public_url = self.public_url.rstrip("/")
        return self

    @property
    def targets_base_url(self) -> str:
        """The targets URL devices get at enrollment (``targets_url`` or this server's own)."""
        return (self.targets_url or f"{self.public_url.rstrip('/')}/tuf/targets").rstrip("/") + "/"

    @property
    def cloud_dir(self) -> Path:
        """Where `fleet cloud serve` keeps its bundles and TUF metadata (``cloud_data_dir``)."""
        if self.cloud_data_dir is not None:
            return self.cloud_data_dir
        return self.data_dir / "cloud" / f"{self.cloud_host.replace(':', '_')}-{self.cloud_port}"

    @property
    def embedded_broker(self) -> bool:
        return not self.mqtt_url

    @property
    def shared_subscriptions(self) -> bool:
        if self.mqtt_shared_subscriptions is not None:
            return self.mqtt_shared_subscriptions
        return not self.embedded_broker

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` listens on this machine only. Not ``""``: servers bind that to all interfaces."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def mqtt_connect_endpoint(self) -> tuple[str, int]:
        """(host, port) the server itself connects to."""
        if self.mqtt_url:
            parts = urlsplit(self.mqtt_url)
            return parts.hostname or "127.0.0.1", parts.port or 8883
        return ("127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host), self.mqtt_port  # noqa: S104

    def mqtt_endpoint(self) -> tuple[str, int]:
        """(host, port) devices connect to."""
        if self.mqtt_url:
            parts = urlsplit(self.mqtt_url)
            host = self.mqtt_public_host or parts.hostname or "localhost"
            return host, parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)
        return self.mqtt_public_host or self.host, self.mqtt_port
