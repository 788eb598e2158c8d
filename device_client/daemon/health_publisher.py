"""Health windows (:class:`HealthPublisher`): every ``health_window_s`` one window per hosted model,
one per part of the window a replaced model served, and one per running shadow candidate, sent
over MQTT at QoS 0 under a device-monotonic seq."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from ..health import WindowStats
from ..mqtt import MqttLink
from ..protocol import ServeMode, TopicKind, device_topic
from ..protocol.messages import utcnow
from ..runtime import ModelHost
from .reporting import now_ms


class HealthPublisher:
    """Publishes the hosts' health windows; ``link`` is set once the daemon connects MQTT."""

    def __init__(self, device_id: str, hosts: Mapping[str, ModelHost]) -> None:
        self.device_id = device_id
        self.hosts = hosts
        self.topic = device_topic(device_id, TopicKind.health)
        self.link: MqttLink | None = None
        self._seq = now_ms()

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, now_ms())
        return self._seq

    def publish(self) -> None:
        """One window per hosted model (and one more per running shadow candidate)."""
        link = self.link
        for name, host in list(self.hosts.items()):
            serving = host.serving
            closed = host.health.drain_closed()  # the parts of this window served by replaced models
            stats = host.health.snapshot_and_reset()
            if link is None:
                continue
            at = utcnow()
            for version, segment in closed:
                self._send(link, segment, at, name, version, ServeMode.serve)
            if serving is None:
                continue
            self._send(link, stats, at, name, serving.version, ServeMode.serve)
            candidate = host.shadow_candidate
            if candidate is not None:
                self._send(link, stats.shadow_candidate(), at, name, candidate.version, ServeMode.shadow)

    def _send(
        self, link: MqttLink, stats: WindowStats, at: datetime, model: str, version: str, mode: ServeMode
    ) -> None:
        window = stats.to_health_window(
            device_id=self.device_id,
            seq=self._next_seq(),
            at=at,
            model=model,
            version=version,
            mode=mode,
        )
        link.publish(self.topic, window.to_json(), qos=0)
