"""Signing and publishing each device's DesiredState (through the transactional outbox).

A DesiredState is bound to one device: ``seq`` is ``devices.desired_seq + 1`` (strictly
increasing), it expires after ``desired_ttl_s``, and it names one TUF target (the artifact of the
version's variant that fits the device). The signed envelope is stored in ``desired_states`` and an
outbox row (QoS 1, retained, on ``fleet/v1/d/{id}/desired``) is written in the same transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from device_client.protocol.messages import DeploymentPhase, DesiredState, Probation, ServeMode
from device_client.protocol.routing import RoutingPolicy
from device_client.protocol.topics import TopicKind, device_topic
from server.catalog.repository import CatalogRepository
from server.catalog.tables import ModelArtifact
from server.db import utcnow
from server.devices.tables import Device, DeviceStatus
from server.errors import Conflict, Invalid, NotFound
from server.rollouts.desired_repository import DesiredRepository
from server.rollouts.outbox import enqueue, enqueue_many
from server.rollouts.repository import DeploymentRepository
from server.rollouts.tables import DesiredRecord

if TYPE_CHECKING:
    from server.context import ServerContext


def artifact_fits(artifact: ModelArtifact, device: Device | DeviceTarget) -> bool:
    """Whether a variant's hardware constraints admit the device."""
    c = artifact.constraints or {}
    hw = device.hardware or {}
    arches = c.get("arch") or []
    if isinstance(arches, str):
        arches = [arches]
    if arches and device.arch not in arches:
        return False
    if c.get("min_ram_mb") and int(hw.get("ram_mb", 0)) < int(c["min_ram_mb"]):
        return False
    providers = c.get("providers") or []
    if not all(p in (hw.get("execution_providers") or []) for p in providers):
        return False
    return all(f in (hw.get("cpu_flags") or []) for f in c.get("cpu_flags") or [])


def pick_artifact(
    artifacts: list[ModelArtifact], device: Device | DeviceTarget, variant: str | None
) -> ModelArtifact:
    """The named variant, or the most specific constrained variant that fits (the one with the
    most constraints; ties by name), or ``default``."""
    if variant is not None:
        for a in artifacts:
            if a.variant == variant:
                if not artifact_fits(a, device):
                    raise Invalid(f"variant {variant!r} does not fit device {device.id!r}")
                return a
        raise NotFound(f"no variant {variant!r}")
    fitting = [a for a in artifacts if artifact_fits(a, device)]
    specific = sorted((a for a in fitting if a.constraints), key=lambda a: -len(a.constraints))
    for candidate in (specific, [a for a in fitting if a.variant == "default"], fitting):
        if candidate:
            return candidate[0]
    raise Invalid(f"no variant of this version fits device {device.id!r} ({device.arch})")


def hardware_kind(arch: str, hardware: dict[str, Any]) -> tuple[Any, ...]:
    """What :func:`artifact_fits` reads of a device: devices of one kind get the same variant."""
    return (
        arch,
        hardware.get("ram_mb"),
        tuple(hardware.get("execution_providers") or ()),
        tuple(sorted(hardware.get("cpu_flags") or ())),  # the same flags in any order: one kind
    )


def count_variants(
    artifacts: Sequence[ModelArtifact], devices: Iterable[Any]
) -> tuple[Counter[str], list[str]]:
    """Devices per variant the director picks (:func:`pick_artifact`), and the ids of the devices
    no variant fits; ``devices`` are rows with ``id``, ``arch`` and ``hardware``. The rollout
    preview and rollout creation count with this, the engine signs with the same choice."""
    counts: Counter[str] = Counter({a.variant: 0 for a in artifacts})
    unfit: list[str] = []
    picked: dict[tuple[Any, ...], str | None] = {}
    for d in devices:
        hardware = d.hardware or {}
        kind = hardware_kind(d.arch, hardware)
        if kind not in picked:
            target = DeviceTarget(d.id, DeviceStatus.online, d.arch, hardware, 0)
            try:
                picked[kind] = pick_artifact(list(artifacts), target, None).variant
            except Invalid:
                picked[kind] = None
        variant = picked[kind]
        if variant is None:
            unfit.append(d.id)
        else:
            counts[variant] += 1
    return counts, unfit


#: deployment phases in which the device has given up the version of its DesiredState and runs
#: the one before: a re-sign must not hand it that version again (:meth:`resign_expiring_ids`)
GIVEN_UP = frozenset({DeploymentPhase.failed, DeploymentPhase.rolled_back})


@dataclass(frozen=True)
class DeviceTarget:
    """What signing a DesiredState needs to know of a device (bulk paths use this, not ORM)."""

    id: str
    status: DeviceStatus
    arch: str
    hardware: dict[str, Any]
    desired_seq: int


class DesiredStateService:
    def __init__(self, session: Session, ctx: ServerContext) -> None:
        self.session = session
        self.ctx = ctx
        self.records = DesiredRepository(session)
        self.catalog = CatalogRepository(session)
        #: (model, version) -> (version row, its artifacts), looked up once per service instance
        self._versions: dict[tuple[str, str], tuple[Any, list[ModelArtifact]]] = {}
        #: current records of prefetched devices (None = known to have none): no SELECT per device
        self._prefetched: dict[str, DesiredRecord | None] = {}
        #: bulk mode (after :meth:`prefetch`): new records and outbox rows, written by :meth:`flush_bulk`
        self._new: dict[str, dict[str, Any]] = {}
        self._outbox: list[tuple[str, dict[str, Any] | bytes]] = []

    def prefetch(self, device_ids: list[str]) -> None:
        """Bulk mode for signing many DesiredStates in one transaction (the engine notifies
        thousands of devices per tick): the devices' current records are loaded at once, and new
        records and outbox rows are written with one multi-row INSERT each by :meth:`flush_bulk`."""
        found = {r.device_id: r for r in self.records.for_devices(device_ids)}
        for device_id in device_ids:
            self._prefetched[device_id] = found.get(device_id)

    def flush_bulk(self) -> None:
        if self._new:
            self.records.insert_many(list(self._new.values()))
            self._new.clear()
        if self._outbox:
            enqueue_many(self.session, self._outbox)
            self._outbox.clear()

    def _version(self, model: str, version: str) -> tuple[Any, list[ModelArtifact]]:
        key = (model, version)
        if key not in self._versions:
            mv = self.catalog.active_version(model, version)
            if mv is None:
                raise NotFound(f"no active version {version!r} of model {model!r}")
            self._versions[key] = (mv, list(self.catalog.published_artifacts(mv.id)))
        return self._versions[key]

    def assign(
        self,
        device: Device,
        model: str,
        version: str,
        *,
        variant: str | None = None,
        mode: ServeMode = ServeMode.serve,
        probation: Probation | None = None,
        rollout_id: str | None = None,
        routing: RoutingPolicy | None = None,
    ) -> DesiredRecord:
        """Sign a new DesiredState for ``device`` and queue it for publishing (with ``routing``,
        the policy its requests are routed by; None: the edge alone)."""
        if device.status == DeviceStatus.decommissioned:
            raise Conflict(f"device {device.id!r} is decommissioned")
        mv, artifacts = self._version(model, version)
        artifact = pick_artifact(artifacts, device, variant)
        fields: dict[str, Any] = {
            "rollout_id": rollout_id,
            "model": model,
            "version": version,
            "release": mv.release,
            "target": artifact.target_path,
            "length": artifact.length,
            "hashes": {"sha256": artifact.sha256},
            "variant": artifact.variant,
            "mode": mode,
            "probation": probation or Probation(),
            "routing": routing,
        }
        return self._sign_and_queue(device, fields)

    def _sign_and_queue(self, device: Device, fields: dict[str, Any]) -> DesiredRecord:
        now = utcnow()
        seq = (device.desired_seq or 0) + 1
        self.records.set_device_seqs({device.id: seq})  # checks that nobody issued seq meanwhile
        set_committed_value(device, "desired_seq", seq)
        desired = DesiredState.build(
            device_id=device.id,
            seq=seq,
            issued_at=now,
            expires_at=now + timedelta(seconds=self.ctx.settings.desired_ttl_s),
            **fields,
        )
        envelope, data = self.ctx.director.sign_json(desired)
        values: dict[str, Any] = {
            "device_id": device.id,
            "seq": desired.seq,
            "rollout_id": desired.rollout_id,
            "model": desired.model,
            "version": desired.version,
            "release": desired.release,
            "variant": desired.variant,
            "mode": desired.mode.value,
            "probation": desired.probation.model_dump(mode="json"),
            "issued_at": desired.issued_at,
            "expires_at": desired.expires_at,
            "envelope": envelope,
        }
        topic = device_topic(device.id, TopicKind.desired)
        if device.id in self._prefetched:
            record = self._prefetched[device.id]
            if record is None or device.id in self._new:
                self._new[device.id] = values
                record = DesiredRecord(**values)  # transient: inserted by flush_bulk
                self._prefetched[device.id] = record
            else:
                for key, value in values.items():
                    setattr(record, key, value)
            self._outbox.append((topic, data))
            return record
        record = self.records.upsert(DesiredRecord(**values))
        enqueue(self.session, topic, data, qos=1, retain=True)
        return record

    def assign_many(
        self,
        devices: Sequence[DeviceTarget],
        model: str,
        version: str,
        *,
        mode: ServeMode,
        probation: Probation,
        rollout_id: str | None,
        routing: RoutingPolicy | None = None,
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Sign and queue a DesiredState for each of many devices in a few statements: the
        rollout engine notifies thousands per tick (:class:`DeviceTarget`, no ORM objects). Each
        device gets exactly what
        :meth:`assign` would give it. Returns (seq by device id, reason by device id not notified).
        """
        seqs: dict[str, int] = {}
        errors: dict[str, str] = {}
        try:
            mv, artifacts = self._version(model, version)
        except NotFound as exc:  # e.g. the version was revoked while the rollout ran
            return seqs, {d.id: exc.message for d in devices}
        now = utcnow()
        expires = now + timedelta(seconds=self.ctx.settings.desired_ttl_s)
        records: list[dict[str, Any]] = []
        outbox: list[tuple[str, dict[str, Any] | bytes]] = []
        # the variant depends only on what artifact_fits reads: pick once per kind of hardware
        picked: dict[tuple[Any, ...], ModelArtifact | None] = {}
        for device in devices:
            if device.status == DeviceStatus.decommissioned:
                errors[device.id] = f"device {device.id!r} is decommissioned"
                continue
            hw = device.hardware or {}
            kind = hardware_kind(device.arch, hw)
            artifact = picked.get(kind)
            if artifact is None:
                try:
                    artifact = picked[kind] = pick_artifact(artifacts, device, None)
                except (Invalid, NotFound) as exc:  # (no variant fits: rare, the message names the device)
                    errors[device.id] = exc.message
                    continue
            seq = (device.desired_seq or 0) + 1
            desired = DesiredState.build(
                device_id=device.id, seq=seq, issued_at=now, expires_at=expires, rollout_id=rollout_id,
                model=model, version=version, release=mv.release, target=artifact.target_path,
                length=artifact.length, hashes={"sha256": artifact.sha256}, variant=artifact.variant,
                mode=mode, probation=probation, routing=routing,
            )  # fmt: skip
            envelope, data = self.ctx.director.sign_json(desired)
            records.append({
                "device_id": device.id, "seq": seq, "rollout_id": rollout_id, "model": model,
                "version": version, "release": mv.release, "variant": artifact.variant, "mode": mode.value,
                "probation": probation.model_dump(mode="json"), "issued_at": now, "expires_at": expires,
                "envelope": envelope,
            })  # fmt: skip
            outbox.append((device_topic(device.id, TopicKind.desired), data))
            seqs[device.id] = seq
        self.records.set_device_seqs(seqs)  # first: the seq check, and the devices' rows before the
        self.records.upsert_many(records)  # records', the order the ingest takes them in
        enqueue_many(self.session, outbox)
        return seqs, errors

    def republish_current(self, device_ids: list[str]) -> int:
        """Publish again, retained, the DesiredState of each device that came back online, unless it
        expires soon (:meth:`resign_expiring_ids` re-signs and publishes those). The broker should
        still hold it, but a broker restarted without its persistence file (killed between two
        autosaves, or a new broker) does not; the device ignores a seq it already has. Returns
        how many were queued."""
        soon = utcnow() + timedelta(seconds=self.ctx.settings.desired_resign_before_s)
        rows = self.records.current_envelopes(device_ids, soon)
        enqueue_many(self.session, [(device_topic(d, TopicKind.desired), envelope) for d, envelope in rows])
        return len(rows)

    def resign_expiring_ids(self, device_ids: list[str]) -> int:
        """Re-sign the DesiredStates of ``device_ids`` that expired or expire soon (devices coming
        back online; MQTT ingest calls it once per batch): the same target with a new seq and
        expiry; the deployments the old states carried follow the new seq. A state whose
        deployment ended ``failed`` or ``rolled_back`` (:data:`GIVEN_UP`) is not re-signed: the
        device runs what it ran before, and a new seq would make it install the version again.
        A few statements however many devices: one SELECT of the expiring records with their
        devices' seq, one of the deployments they carry, one upsert of the records, one bulk UPDATE
        of the devices' seq, one of the deployments' and one outbox INSERT. Returns how many were
        re-signed."""
        soon = utcnow() + timedelta(seconds=self.ctx.settings.desired_resign_before_s)
        expiring = self.records.expiring_with_seq(device_ids, soon)
        if not expiring:
            return 0
        deployments = DeploymentRepository(self.session)
        carried = deployments.states_for_desired([(d, env["signed"]["seq"]) for d, env, _ in expiring])
        # a state whose deployment the device gave up (it reverted in probation, or the install
        # failed) is left to expire: re-signed, it would look new and be installed again
        given_up = {key for key, st in carried.items() if st.phase in GIVEN_UP}
        expiring = [(d, env, seq) for d, env, seq in expiring if (d, env["signed"]["seq"]) not in given_up]
        if not expiring:
            return 0
        now = utcnow()
        expires = now + timedelta(seconds=self.ctx.settings.desired_ttl_s)
        records: list[dict[str, Any]] = []
        outbox: list[tuple[str, dict[str, Any] | bytes]] = []
        seqs: dict[str, int] = {}
        moves: list[tuple[str, int, int]] = []
        for device_id, envelope, desired_seq in expiring:
            fields = {
                k: v
                for k, v in envelope["signed"].items()
                if k not in ("schema", "device_id", "seq", "issued_at", "expires_at")
            }
            seq = (desired_seq or 0) + 1
            desired = DesiredState.build(
                device_id=device_id, seq=seq, issued_at=now, expires_at=expires, **fields
            )
            signed, data = self.ctx.director.sign_json(desired)
            records.append({
                "device_id": device_id, "seq": seq, "rollout_id": desired.rollout_id,
                "model": desired.model, "version": desired.version, "release": desired.release,
                "variant": desired.variant, "mode": desired.mode.value,
                "probation": desired.probation.model_dump(mode="json"), "issued_at": now,
                "expires_at": expires, "envelope": signed,
            })  # fmt: skip
            outbox.append((device_topic(device_id, TopicKind.desired), data))
            seqs[device_id] = seq
            moves.append((device_id, envelope["signed"]["seq"], seq))
        self.records.set_device_seqs(seqs)
        self.records.upsert_many(records)
        deployments.follow_resigned(moves, carried)
        enqueue_many(self.session, outbox)
        return len(records)
