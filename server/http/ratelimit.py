"""Rate limits for the anonymous endpoints: a token bucket per client address, in this process.

The client address is the connection's peer, or the address a trusted proxy put in
``X-Forwarded-For`` (uvicorn rewrites it only for peers in ``FLEET_FORWARDED_ALLOW_IPS``). IPv6
clients are grouped by their /64, which one host usually owns whole. Each replica limits on its
own, so behind a load balancer a client gets at most the replica count times the limit.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Settings

#: buckets kept per limit; the least recently used beyond this are forgotten (memory stays bounded)
MAX_CLIENTS = 100_000


class TokenBucket:
    """``burst`` requests at once, refilled at ``rate_per_s``; one bucket per client key."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if there was one, else the seconds until
        there will be (nothing is spent then)."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


def client_key(scope: Scope) -> str:
    """The bucket key of a request: its client address, IPv6 addresses by their /64."""
    client = scope.get("client")
    host = client[0] if client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class RateRule:
    method: str
    path: re.Pattern[str]
    bucket: TokenBucket
    #: what is limited, for the 429's message
    what: str


def rate_rules(settings: Settings) -> tuple[RateRule, ...]:
    """Enrollment and the CRL, per client address (a rate of 0 leaves an endpoint unlimited)."""
    rules = []
    if settings.enroll_rate_per_s > 0:
        bucket = TokenBucket(settings.enroll_rate_per_s, settings.enroll_rate_burst)
        rules.append(RateRule("POST", re.compile(r"/api/v1/enroll/?"), bucket, "enrollment requests"))
    if settings.crl_rate_per_s > 0:
        bucket = TokenBucket(settings.crl_rate_per_s, settings.crl_rate_burst)
        rules.append(RateRule("GET", re.compile(r"/api/v1/pki/crl\.pem"), bucket, "CRL requests"))
    return tuple(rules)


class RateLimitMiddleware:
    """Pure ASGI middleware: 429 with ``Retry-After`` once a client's bucket for a rule is empty,
    before anything of the request (its body included) is read."""

    def __init__(self, app: ASGIApp, rules: tuple[RateRule, ...]) -> None:
        self.app = app
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for rule in self.rules:
                if rule.method == scope["method"] and rule.path.fullmatch(scope["path"]):
                    wait = rule.bucket.take(client_key(scope))
                    if wait > 0:
                        await _send_429(send, rule.what, math.ceil(wait))
                        return
                    break
        await self.app(scope, receive, send)


async def _send_429(send: Send, what: str, retry_after: int) -> None:
    body = json.dumps(
        {"detail": f"too many {what} from this address; retry in {retry_after} s", "code": "rate_limited"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after).encode()),
                (b"connection", b"close"),  # a body may follow, unread
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
