"""Building a :class:`~.router.Router` from a routing policy and the device's own settings: the
cache directory, the budget and breaker, and the cloud client with the right credentials (the
device's certificate and token for the ``fleet`` endpoint; the policy's CA and a locally held
secret for an external one, which never sees the device's fleet credentials)."""

from __future__ import annotations

import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import numpy as np

from ..config import DeviceSettings
from ..enroll import Identity
from ..protocol.names import MODEL_NAME_RE
from ..protocol.routing import CloudSpec, RoutingPolicy
from ..tlstrust import client_context
from .breaker import CircuitBreaker
from .budget import TokenBucket
from .cache import AnswerCache
from .oip import DEFAULT_MAX_RESPONSE_BYTES, OipClient
from .router import EdgeFn, Router
from .stats import RoutingStats

log = logging.getLogger(__name__)

#: under the data directory: one cache directory per edge model
CACHE_DIR = "cloud-cache"
#: under the data directory: credentials of external endpoints, one file per secret name (0600)
SECRETS_DIR = "secrets"
MAX_SECRET_BYTES = 8192


class CloudConfigError(ValueError):
    """The device cannot reach the policy's cloud (no fleet cloud URL, a missing secret, a bad CA)."""


@dataclass(frozen=True)
class RoutingEnvironment:
    """What the device brings to a policy: where to keep the cache, where the fleet's cloud tier
    is, and how the device proves who it is there."""

    data_dir: Path
    #: base URL of the fleet's cloud tier (``fleet cloud serve``); None: the ``fleet`` endpoint is
    #: unusable and every escalation to it falls back (``cloud_failed:unconfigured``)
    fleet_url: str | None = None
    device_token: str | None = field(default=None, repr=False)
    client_cert: Path | None = None
    client_key: Path | None = None
    #: CA verifying the fleet cloud tier's certificate (None: the system's CAs)
    fleet_ca: Path | None = None
    #: where named secrets live (None: ``<data_dir>/secrets``)
    secrets_dir: Path | None = None
    #: allow a plain ``http://`` fleet URL (a lab); external endpoints are always https
    insecure_http: bool = False
    cloud_workers: int = 8
    background_queue: int = 16
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    @classmethod
    def from_device_settings(
        cls,
        settings: DeviceSettings,
        identity: Identity | None = None,
        *,
        fleet_url: str | None = None,
        insecure_http: bool = False,
    ) -> RoutingEnvironment:
        """The device's credentials as the daemon uses them: a setting wins over what enrollment
        stored in ``identity`` (token, client certificate and key, fleet CA)."""
        token = settings.device_token.get_secret_value() if settings.device_token else None
        return cls(
            data_dir=Path(settings.data_dir).absolute(),
            fleet_url=fleet_url,
            device_token=token or (identity.device_token if identity else None),
            client_cert=settings.client_cert or (identity.cert_file if identity else None),
            client_key=settings.client_key or (identity.key_file if identity else None),
            fleet_ca=settings.ca_cert or (identity.ca_file if identity else None),
            insecure_http=insecure_http,
        )

    def secret_path(self, name: str) -> Path:
        return (self.secrets_dir or self.data_dir / SECRETS_DIR) / name


class _Answer(Protocol):
    @property
    def outputs(self) -> Mapping[str, np.ndarray]: ...


class _Infers(Protocol):
    def infer(self, inputs: Mapping[str, np.ndarray]) -> _Answer: ...


def host_edge(host: _Infers) -> EdgeFn:
    """The edge callable of a :class:`~device_client.runtime.ModelHost`."""

    def edge(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(host.infer(inputs).outputs)

    return edge


def read_secret(path: Path) -> str:
    """A credential from its file (no symlinks; one line of printable ASCII)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise CloudConfigError(f"secret {path.name!r} is not readable at {path}: {exc.strerror}") from None
    value = raw.rstrip(b"\r\n")
    if len(raw) > MAX_SECRET_BYTES or not value or any(b < 0x20 or b > 0x7E for b in value):
        raise CloudConfigError(f"secret {path.name!r} must be one line of printable ASCII")
    return value.decode("ascii")


def build_cloud_client(cloud: CloudSpec, env: RoutingEnvironment) -> OipClient:
    """The OIP client for ``cloud``; raises :class:`CloudConfigError`."""
    headers: dict[str, str] = {"User-Agent": "fleetota-device"}
    if cloud.is_fleet:
        if not env.fleet_url:
            raise CloudConfigError("the policy names the fleet endpoint; no fleet cloud URL is configured")
        scheme = env.fleet_url.split(":", 1)[0].lower()
        if scheme not in ("https", "http") or (scheme == "http" and not env.insecure_http):
            raise CloudConfigError(f"fleet cloud URL {env.fleet_url!r} must be https://")
        verify: ssl.SSLContext | bool = False
        if scheme == "https":
            try:
                verify = client_context(
                    ca_file=env.fleet_ca, client_cert=env.client_cert, client_key=env.client_key
                )
            except (OSError, ssl.SSLError) as exc:
                raise CloudConfigError(f"TLS set-up for the fleet cloud failed: {exc}") from None
        if env.device_token:
            headers["Authorization"] = f"Bearer {env.device_token}"
        base = env.fleet_url
    else:
        try:
            verify = ssl.create_default_context(cafile=cloud.ca_file, cadata=cloud.ca_pem)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise CloudConfigError(f"CA of the cloud endpoint is unusable: {exc}") from None
        verify.minimum_version = ssl.TLSVersion.TLSv1_2
        if cloud.credential is not None:
            secret = read_secret(env.secret_path(cloud.credential.secret))
            headers[cloud.credential.header] = cloud.credential.prefix + secret
        base = cloud.endpoint
    http = httpx.Client(
        verify=verify,
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(
            max_connections=env.cloud_workers + 2, max_keepalive_connections=env.cloud_workers
        ),
    )
    return OipClient(
        base,
        cloud.model,
        cloud.version,
        timeout_s=cloud.timeout_ms / 1000.0,
        http=http,
        headers=headers,
        max_response_bytes=env.max_response_bytes,
    )


def build_router(
    policy: RoutingPolicy,
    env: RoutingEnvironment,
    edge: EdgeFn,
    *,
    model: str,
    stats: RoutingStats | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rand: Callable[[], float] = random.random,
) -> Router:
    """A router for the edge model ``model`` following ``policy``. Pass the previous router's
    ``stats`` when a new policy replaces it, so the health window carries on. A cloud the device
    cannot reach as configured (:class:`CloudConfigError`) is logged and shown in
    :meth:`Router.status`; every escalation then falls back (``cloud_failed:unconfigured``)."""
    if not MODEL_NAME_RE.fullmatch(model):
        raise ValueError(f"{model!r} is not a model name")
    cache = AnswerCache(
        env.data_dir / CACHE_DIR / model,
        max_bytes=policy.cache.max_bytes,
        ttl_s=policy.cache.ttl_s,
        clock=wall_clock,
    )
    budget = TokenBucket(policy.budget.per_minute, policy.budget.burst, clock=clock)
    spec = policy.breaker
    breaker = CircuitBreaker(spec.failures, spec.open_s, spec.probes, clock=clock)
    client: OipClient | None = None
    problem = None
    if policy.cloud is not None:
        try:
            client = build_cloud_client(policy.cloud, env)
        except CloudConfigError as exc:
            problem = str(exc)
            log.warning("routing for %s: the cloud is unusable: %s", model, exc)
    return Router(
        policy,
        edge,
        client,
        cache,
        budget,
        breaker,
        clock,
        stats or RoutingStats(clock=clock),
        cloud_workers=env.cloud_workers,
        background_queue=env.background_queue,
        rand=rand,
        cloud_problem=problem,
    )
