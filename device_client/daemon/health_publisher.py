"""Health windows (:class:`HealthPublisher`): every ``health_window_s`` one window per hosted model,
one per part of the window a replaced model served, and one per running shadow candidate, sent
over MQTT at QoS 0 under a device-monotonic seq. Each window names the variant that served it and
the process's resident memory at its end. A model with a routing policy adds the window's routing
counters to the window of the version serving at its end."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ..health import WindowStats
from ..mqtt import MqttLink
from ..protocol import HealthWindow, ServeMode, TopicKind, device_topic
from ..protocol.messages import utcnow
from ..routing import RoutingTable
from ..runtime import ModelHost
from .reporting import now_ms

log = logging.getLogger(__name__)


def rss_bytes() -> int | None:
    """The process's resident memory (``/proc/self/statm``; None where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident * os.sysconf("SC_PAGE_SIZE")


def routing_fields(drained: Mapping[str, Any]) -> dict[str, Any]:
    """The ``HealthWindow`` fields of a ``RoutingStats.drain()``. The rate is capped at 1: a
    request escalated while the window was drained is counted there before it is answered."""
    rate = drained["escalation_rate"]
    return {
        "answered_edge": drained["edge"],
        "answered_cloud": drained["cloud"],
        "answered_cache": drained["cache"],
        "escalations": drained["escalations"],
        "budget_limited": drained["budget_limited"],
        "breaker_open": drained["breaker_open"],
        "cloud_failed": drained["cloud_failed"],
        "escalation_rate": min(rate, 1.0) if rate is not None else None,
        "cloud_p95_ms": drained["cloud_p95_ms"],
        "cloud_compared": drained["cloud_compared"],
        "cloud_agreement": drained["cloud_agreement"],
    }


class HealthPublisher:
    """Publishes the hosts' health windows; ``link`` is set once the daemon connects MQTT."""

    def __init__(
        self, device_id: str, hosts: Mapping[str, ModelHost], routing: RoutingTable | None = None
    ) -> None:
        self.device_id = device_id
        self.hosts = hosts
        self.routing = routing
        self.topic = device_topic(device_id, TopicKind.health)
        self.link: MqttLink | None = None
        self._seq = now_ms()
        #: (model, version) -> the variant last seen serving or shadowing it: the variant of the
        #: parts of a window a replaced model served
        self._variants: dict[tuple[str, str], str] = {}

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, now_ms())
        return self._seq

    def publish(self) -> None:
        """One window per hosted model (and one more per running shadow candidate)."""
        link = self.link
        rss = rss_bytes()
        for name, host in list(self.hosts.items()):
            serving = host.serving
            for loaded in (host.previous, serving, host.shadow_candidate):
                if loaded is not None:
                    self._variants[(name, loaded.version)] = loaded.manifest.variant
            closed = host.health.drain_closed()  # the parts of this window served by replaced models
            stats = host.health.snapshot_and_reset()
            drained = self.routing.drain(name) if self.routing is not None else None
            if link is None:
                continue
            at = utcnow()
            for version, segment in closed:
                self._send(link, segment, at, name, version, ServeMode.serve, rss=rss)
            if serving is None:
                continue
            extra = routing_fields(drained) if drained is not None else None
            self._send(link, stats, at, name, serving.version, ServeMode.serve, extra, rss=rss)
            candidate = host.shadow_candidate
            if candidate is not None:
                shadow = stats.shadow_candidate()
                self._send(link, shadow, at, name, candidate.version, ServeMode.shadow, rss=rss)

    def _send(
        self,
        link: MqttLink,
        stats: WindowStats,
        at: datetime,
        model: str,
        version: str,
        mode: ServeMode,
        extra: Mapping[str, Any] | None = None,
        *,
        rss: int | None = None,
    ) -> None:
        window = stats.to_health_window(
            device_id=self.device_id,
            seq=self._next_seq(),
            at=at,
            model=model,
            version=version,
            mode=mode,
            variant=self._variants.get((model, version)),
            rss_bytes=rss,
        )
        if extra:
            try:
                window = HealthWindow.model_validate({**window.to_dict(), **extra})
            except ValidationError as exc:  # the window goes out without them rather than not at all
                log.warning("routing counters of %s left out of its health window: %s", model, exc)
        link.publish(self.topic, window.to_json(), qos=0)
