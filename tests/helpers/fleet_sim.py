"""An in-memory fleet for rollout tests: simulated devices that speak the real protocol.

Each :class:`SimDevice` reads the signed DesiredState the server holds for it, verifies the
director's signature, and answers with real ``fleet.report/1``, ``fleet.health/1`` and
``fleet.presence/1`` payloads, which go through the server's real ingest path
(:class:`server.mqtt.handlers.IngestWorker`) without a broker. How a version behaves on a device
(install failure, error rate, latency, shadow agreement, and under a routing policy its escalation
rate and cloud agreement) is a :class:`Behaviour`.

Health windows are short (:data:`WINDOW_S`) and never overlap, so that the many windows a test
sends within a second stay plausible to the server (server/health/plausibility.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from device_client.protocol import DesiredState, HealthWindow, Presence, Report, validate_payload
from device_client.protocol.messages import utcnow
from device_client.protocol.signing import verify_envelope
from server.mqtt.handlers import IngestWorker
from server.rollouts.tables import DesiredRecord

#: the period each simulated health window covers (100 requests in it: 20,000 per second)
WINDOW_S = 0.005


@dataclass
class Behaviour:
    install_fails: bool = False
    #: installed, then reverted in probation: the device serves what it served before and reports
    #: ``rolled_back`` (a probation breach)
    reverts: bool = False
    error_rate: float = 0.0
    p95_ms: float = 5.0
    agreement: float = 1.0
    #: under a routing policy (serve windows carry the hybrid fields when set): the share of
    #: requests escalated (answered by the cloud), and how often the edge answer matched the cloud's
    escalation_rate: float | None = None
    cloud_agreement: float = 1.0
    cloud_p95_ms: float = 40.0
    #: serve windows carry this CPU time per request when set
    cpu_ms: float | None = None


def hybrid_fields(requests: int, b: Behaviour) -> dict[str, Any]:
    """The routing fields of a serve window of ``requests`` requests behaving as ``b``: every
    escalation answered by the cloud and compared with the edge answer."""
    escalated = round(requests * (b.escalation_rate or 0.0))
    return {
        "answered_edge": requests - escalated, "answered_cloud": escalated, "answered_cache": 0,
        "escalations": escalated, "budget_limited": 0, "breaker_open": 0, "cloud_failed": 0,
        "escalation_rate": escalated / requests if requests else None,
        "cloud_p95_ms": b.cloud_p95_ms if escalated else None, "cloud_compared": escalated,
        "cloud_agreement": b.cloud_agreement if escalated else None,
    }  # fmt: skip


@dataclass
class SimDevice:
    device_id: str
    serving: dict[str, str] = field(default_factory=dict)
    online: bool = True
    seq: int = 0
    health_seq: int = 0
    handled_desired: int = 0
    shadow: dict[str, str] = field(default_factory=dict)
    #: end of the device's last health window: the next one starts no earlier
    health_until: datetime | None = None
    #: the routing policy of the DesiredState it acted on last (None: none)
    routing: dict[str, Any] | None = None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class SimFleet:
    def __init__(
        self,
        ctx,
        device_ids: list[str],
        *,
        model: str = "det",
        behaviours: dict[str, Behaviour] | None = None,
    ) -> None:
        self.ctx = ctx
        self.model = model
        self.devices = {d: SimDevice(d) for d in device_ids}
        self.behaviours = behaviours or {}
        #: device id -> fields its health windows claim whatever the truth (a lying device)
        self.lies: dict[str, dict[str, Any]] = {}
        #: device id -> ``details`` of each of its reports
        self.report_details: dict[str, dict[str, Any]] = {}
        #: (version, routing policy the device holds) -> how it behaves, instead of
        #: ``behaviours[version]`` (None: that); e.g. a policy's threshold sets the escalation rate
        self.by_policy: Callable[[str, dict[str, Any] | None], Behaviour | None] | None = None
        self.ingest = IngestWorker(ctx, ctx.metrics)
        self.director = ctx.director.key.public_key()

    def _send(self, messages: list[tuple[str, str, bytes]]) -> None:
        now = utcnow()
        self.ingest.process([(f"fleet/v1/d/{d}/{kind}", payload, now) for d, kind, payload in messages])

    def window(self, device_id: str, seq: int, at: datetime, **fields: Any) -> None:
        """Send one health window as ``device_id`` would, with any claims in ``fields`` (a 1 s
        window of 10 requests without errors for the version it serves, unless they say so)."""
        claims = {"window_s": 1.0, "model": self.model, "requests": 10, "errors": 0, **fields}
        claims.setdefault("version", self.devices[device_id].serving[self.model])
        window = HealthWindow.build(device_id=device_id, seq=seq, at=at, **claims)
        self._send([(device_id, "health", window.to_json())])

    def presence(self, device_id: str, online: bool = True) -> None:
        dev = self.devices[device_id]
        dev.online = online
        self._send([(device_id, "presence", Presence.build(
            device_id=device_id, status="online" if online else "offline", at=utcnow(), serving=dev.serving,
        ).to_json())])  # fmt: skip

    def start(self, serving_version: str | None = None) -> None:
        for dev in self.devices.values():
            if serving_version:
                dev.serving = {self.model: serving_version}
            self.presence(dev.device_id, True)

    def health(self, *, at_offset_s: float = 0.0, requests: int = 100) -> None:
        """One health window per online device for what it serves (and shadows), ending now (plus
        ``at_offset_s``) or, for a device that already reported that late, :data:`WINDOW_S` after
        its last window."""
        msgs = []
        now = utcnow() + timedelta(seconds=at_offset_s)
        for dev in self.devices.values():
            if not dev.online:
                continue
            at = now
            if dev.health_until is not None:
                at = max(at, dev.health_until + timedelta(seconds=WINDOW_S))
            dev.health_until = at
            for mode, table in (("serve", dev.serving), ("shadow", dev.shadow)):
                version = table.get(self.model)
                if version is None:
                    continue
                b = self.behaviour(version, dev.routing if mode == "serve" else None)
                dev.health_seq += 1
                extra = {}
                if mode == "shadow":
                    extra = {"shadow_requests": requests, "agreement": b.agreement, "shadow_p95_ms": b.p95_ms}
                elif b.escalation_rate is not None:
                    extra = hybrid_fields(requests, b)
                if mode == "serve" and b.cpu_ms is not None:
                    extra["cpu_ms_per_request"] = b.cpu_ms
                fields = {
                    "device_id": dev.device_id, "seq": dev.health_seq, "at": at, "window_s": WINDOW_S,
                    "model": self.model, "version": version, "mode": mode, "requests": requests,
                    "errors": round(requests * b.error_rate), "p50_ms": b.p95_ms / 2, "p95_ms": b.p95_ms,
                    "p99_ms": b.p95_ms * 1.2, **extra, **self.lies.get(dev.device_id, {}),
                }  # fmt: skip
                msgs.append((dev.device_id, "health", HealthWindow.build(**fields).to_json()))
        self._send(msgs)

    def behaviour(self, version: str, routing: dict[str, Any] | None) -> Behaviour:
        chosen = self.by_policy(version, routing) if self.by_policy is not None else None
        return chosen or self.behaviours.get(version, Behaviour())

    def step(self) -> int:
        """Every online device acts on a new DesiredState (install, probation, verdict); returns how many."""
        acted = 0
        with self.ctx.db.session_scope() as s:
            records = {
                r.device_id: r.envelope
                for r in s.query(DesiredRecord).filter(DesiredRecord.device_id.in_(list(self.devices)))
            }
        msgs = []
        for dev in self.devices.values():
            env = records.get(dev.device_id)
            if env is None or not dev.online:
                continue
            desired = validate_payload(verify_envelope(env, [self.director]), DesiredState)
            if desired.seq <= dev.handled_desired:
                continue
            dev.handled_desired = desired.seq
            acted += 1
            b = self.behaviours.get(desired.version, Behaviour())

            def report(phase, reason=None, d=desired, dev=dev):
                return (dev.device_id, "report", Report.build(
                    device_id=dev.device_id, seq=dev.next_seq(), at=utcnow(), phase=phase, desired_seq=d.seq,
                    rollout_id=d.rollout_id, model=d.model, version=d.version, reason=reason,
                    serving=dict(dev.serving), details=self.report_details.get(dev.device_id, {}),
                ).to_json())  # fmt: skip

            msgs += [report("downloading"), report("verifying"), report("installing")]
            if b.install_fails:
                msgs.append(report("failed", "validation vectors do not match"))
                continue
            if desired.mode.value == "shadow":
                dev.shadow = {desired.model: desired.version}
                msgs.append(report("probation"))
                msgs.append(report("succeeded"))
                continue
            dev.shadow = {}
            before, routing_before = dict(dev.serving), dev.routing
            dev.serving = {desired.model: desired.version}
            dev.routing = None if desired.routing is None else desired.routing.to_dict()
            msgs.append(report("probation"))
            if b.reverts:
                dev.serving, dev.routing = before, routing_before
                msgs.append(report("rolled_back", "probation breached: error rate"))
                continue
            msgs.append(report("succeeded"))
        self._send(msgs)
        return acted
