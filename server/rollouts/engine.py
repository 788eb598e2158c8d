"""The rollout engine: advances every running (or rolling-back) rollout, one tick at a time.

Each tick handles each active rollout in its own transaction, holding the rollout's row lock
(``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two server processes never advance the
same rollout at once: the second one skips it for that tick. All state is in the database, so a
restarted server resumes every rollout where it was.

A tick of a running rollout:

1. times out online devices that made no progress within ``device_timeout_s``;
2. notifies the current stage's pending devices: a signed DesiredState each (through the outbox),
   online devices within ``max_concurrent_downloads``, offline ones at once (the retained message
   brings them along when they return, and they do not block the stage — unless they had begun
   the update before going quiet: those block it until they report or time out);
3. trips early when failures alone already breach ``max_failure_ratio`` for the whole stage;
4. once every online device of the stage has finished, starts the soak; when the soak ends, waits
   for enough evidence (:func:`server.rollouts.policy.missing_evidence`: succeeded devices that
   reported health, requests; up to ``stage_timeout_s``, then pauses), evaluates the gates
   (:func:`server.rollouts.variants.evaluate_variants`: per variant of the new version) on the
   health the stage's devices reported since the stage started, and promotes to the next stage,
   completes, or applies ``on_failure`` (pause, or roll every touched device back). A passed
   stage with ``pause_after`` promotes and pauses at once: the next stage waits for an
   operator's resume.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified
from sqlalchemy.orm.exc import StaleDataError

from device_client.loop import BackgroundLoop
from device_client.protocol.messages import DeploymentPhase as P
from device_client.protocol.messages import Probation, ServeMode
from server.admin.service import audit
from server.db import utcnow
from server.devices.tables import DeviceStatus
from server.errors import SeqRace
from server.health.repository import HealthWindowRepository
from server.rollouts.desired import DesiredStateService, DeviceTarget
from server.rollouts.desired_repository import DesiredRepository
from server.rollouts.policy import (
    Gates,
    Stage,
    StageCounts,
    early_trip,
    missing_evidence,
    required_succeeded,
    robust_health,
)
from server.rollouts.repository import DeploymentRepository, RolloutRepository
from server.rollouts.service import RolloutService, baseline_per_device, gates_of, routing_of, settle_phase
from server.rollouts.tables import Rollout, RolloutStatus
from server.rollouts.variants import evaluate_variants

if TYPE_CHECKING:
    from server.context import ServerContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TickCounts:
    """What one GROUP BY tells a tick: the stage's counts, the rollout's in-flight online devices
    (the download budget), and the stage's members waiting for a DesiredState."""

    stage: StageCounts
    busy: int
    pending_online: int
    pending_offline: int


ENGINE = "engine"
#: most DesiredStates one tick signs; a tick that hits it ticks again at once (after its commit, so
#: devices receive the first thousands while the next are being signed)
NOTIFY_CHUNK = 2000
IN_FLIGHT = frozenset({P.notified, P.downloading, P.verifying, P.installing, P.probation})
#: phases a device reaches only by reporting: it has begun the update
STARTED = frozenset({P.downloading, P.verifying, P.installing, P.probation})
FAILED = frozenset({P.failed, P.rolled_back, P.timed_out})
#: how the reason of a rollout paused by a stage's ``pause_after`` begins
APPROVAL_REASON = "waits for approval to start"


class RolloutEngine:
    def __init__(self, ctx: ServerContext, tick_s: float = 1.0) -> None:
        self.ctx = ctx
        self.tick_s = tick_s
        self.ticks = 0
        #: a tick left work undone (a chunk of notifications, a changed rollout): tick again at once
        self._more = False
        #: whether the rollout being advanced had DesiredStates signed in this tick
        self._signed = False
        self._stop = threading.Event()
        self._loop = BackgroundLoop(
            "rollout-engine",
            self._step,
            self._stop,
            failure="rollout engine tick failed; retrying next tick",
            interval_s=lambda: 0 if self._more else self.tick_s,
            logger=log,
        )

    # -- background loop -----------------------------------------------------------------------
    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        self._loop.join(30)

    def _step(self) -> None:
        self._more = False
        self.tick()

    # -- one tick ------------------------------------------------------------------------------
    def tick(self, now: datetime | None = None) -> int:
        """Advance every active rollout once; return how many were advanced by this process."""
        with self.ctx.db.session_scope() as session:
            ids = RolloutRepository(session).active_ids()
        advanced = 0
        for rollout_id in ids:
            try:
                with self.ctx.db.session_scope() as session:
                    repo = RolloutRepository(session)
                    rollout = repo.lock_for_tick(rollout_id, skip_locked=not self.ctx.db.is_sqlite)
                    if rollout is None:
                        continue  # another server holds it, or it stopped being active
                    self._signed = False
                    self.advance(session, rollout, now or utcnow())
                    if self._signed:
                        # a tick that signed DesiredStates writes the row at its commit, checking
                        # the version it read, so that it cannot commit beside an operator action
                        # that read the same version (Rollout.row_version); a tick that changes
                        # the rollout itself is checked anyway. Last, so that on SQLite the write
                        # lock is still taken at the tick's first write
                        flag_modified(rollout, "updated_at")
                    advanced += 1
            except (StaleDataError, SeqRace) as exc:  # optimistic checks: nothing of the tick stands
                self._more = True
                what = "an operator action" if isinstance(exc, StaleDataError) else exc.message
                log.info("rollout %s changed during the tick (%s); ticking again", rollout_id, what)
            except Exception:
                log.exception("advancing rollout %s failed", rollout_id)
        self.ticks += 1
        return advanced

    def advance(self, session: Session, rollout: Rollout, now: datetime) -> None:
        if rollout.status == RolloutStatus.running:
            self._advance_running(session, rollout, now)
        elif rollout.status == RolloutStatus.rolling_back:
            self._advance_rollback(session, rollout, now)

    # -- running -------------------------------------------------------------------------------
    def _advance_running(self, session: Session, rollout: Rollout, now: datetime) -> None:
        """One tick of a running rollout. The work is proportional to the devices that need
        action (timeouts, notifications), not to the fleet: counts come from one GROUP BY."""
        repo = RolloutRepository(session)
        stages = [Stage.model_validate(s) for s in rollout.stages]
        idx = rollout.current_stage
        stage = stages[idx]
        mode = ServeMode.shadow if stage.shadow else ServeMode.serve
        serve = mode == ServeMode.serve

        timeout = timedelta(seconds=rollout.device_timeout_s)
        for dep in repo.overdue(rollout.id, sorted(IN_FLIGHT), now - timeout, sorted(STARTED)):
            settle_phase(dep, P.timed_out)
            dep.reason = f"no progress within {rollout.device_timeout_s}s"

        tick = self._counts(repo.tick_counts(rollout.id, idx), mode)  # autoflushes the timeouts
        gates = gates_of(rollout)
        service = RolloutService(session, self.ctx)
        if self._tripped(repo, service, rollout, idx, gates, tick.stage):
            return  # judged before notifying more: a failing stage stops growing at once
        budget = min(rollout.max_concurrent_downloads - tick.busy, NOTIFY_CHUNK)
        to_notify: list[Any] = []
        if budget > 0 and tick.pending_online:
            to_notify += repo.to_notify(rollout.id, idx, serve=serve, online=True, limit=budget)
        if tick.pending_offline:
            room = NOTIFY_CHUNK - len(to_notify)
            to_notify += repo.to_notify(rollout.id, idx, serve=serve, online=False, limit=max(room, 0))
        if to_notify:
            to_notify.sort(key=lambda d: d.id)
            self._notify(session, rollout, to_notify, mode, now)
            if len(to_notify) >= NOTIFY_CHUNK:
                # the rest in the next tick, at once. Commit now: the devices get these while the
                # next chunk is signed, and on SQLite the write lock is held no longer than needed
                # (the stage cannot settle while devices are still pending; the next tick judges it)
                self._more = True
                return
            tick = self._counts(repo.tick_counts(rollout.id, idx), mode)  # (notifying fails nobody)
        counts = tick.stage
        if not counts.settled:
            return
        if rollout.soak_until is None:
            rollout.soak_until = now + timedelta(seconds=stage.soak_s)
            log.info("rollout %s stage %d settled; soaking %.0fs", rollout.id, idx + 1, stage.soak_s)
            return
        if now < rollout.soak_until:
            return
        self._judge(session, rollout, idx, counts, gates, now)

    def _judge(
        self, session: Session, rollout: Rollout, idx: int, counts: StageCounts, gates: Gates, now: datetime
    ) -> None:
        """A soaked stage: wait for enough evidence (up to ``stage_timeout_s``, then pause), then
        judge the gates on the health its devices reported for the new version since the stage
        started (resumed): promote, complete, or apply ``on_failure``."""
        stages = [Stage.model_validate(s) for s in rollout.stages]
        stage = stages[idx]
        mode = "shadow" if stage.shadow else "serve"
        members = RolloutRepository(session).member_rows(rollout.id, idx)
        ids = [d for d, _, _ in members]
        health_repo = HealthWindowRepository(session)
        since = rollout.stage_started_at or rollout.created_at
        per_device = health_repo.per_device(
            ids, rollout.model, version=rollout.version, mode=mode, since=since
        )
        health = robust_health(per_device)
        reporting = sum(1 for d, phase, _ in members if phase == P.succeeded and d in per_device)
        missing = missing_evidence(gates, counts, health, reporting, stage=idx, shadow=stage.shadow)
        # (failures beyond the gate need no more evidence: they are judged at once)
        waiting = bool(missing) and counts.failure_ratio <= gates.max_failure_ratio
        assert rollout.soak_until is not None
        if waiting and now < rollout.soak_until + timedelta(seconds=gates.stage_timeout_s):
            why = f"stage {idx + 1} waits for evidence: " + "; ".join(missing)
            if rollout.reason != why:  # (the row is written only when this changes)
                rollout.reason = why
            return
        baseline = baseline_per_device(session, rollout, ids)
        # each device's variant as the server signed it, never as its windows claim it: a device
        # naming a variant of its own would be judged alone, past the trimmed mean
        assigned = DesiredRepository(session).assigned_variants(rollout.id, rollout.version, per_device)
        judged = evaluate_variants(
            gates, counts, per_device, baseline, shadow=stage.shadow, assigned=assigned
        )
        verdict = judged.verdict
        numbers = {
            **verdict.numbers,
            "succeeded_reporting": reporting,
            "required_succeeded": required_succeeded(gates, counts.total),
        }
        service = RolloutService(session, self.ctx)
        if waiting:
            # no evidence is no evidence of harm: pause (whatever on_failure) for an operator
            reason = (
                f"stage {idx + 1} has not enough evidence after stage_timeout_s "
                f"({gates.stage_timeout_s:g}s): " + "; ".join(missing)
            )
            log.warning("rollout %s: %s; pausing", rollout.id, reason)
            service.transition(rollout, RolloutStatus.paused, ENGINE, "rollout.pause", {"reason": reason})
            rollout.reason = reason
            rollout.verdict = {"stage": idx, "passed": False, "reasons": missing, "numbers": numbers}
            return
        record = {"stage": idx, "passed": verdict.passed, "reasons": verdict.reasons, "numbers": numbers}
        if judged.variants:
            record["variants"] = judged.variants
        if not verdict.passed:
            self._fail(
                service, rollout, f"stage {idx + 1} gates failed: " + "; ".join(verdict.reasons), record
            )
            return
        rollout.verdict = record
        rollout.reason = None
        if idx + 1 == len(stages):
            service.transition(rollout, RolloutStatus.completed, ENGINE, "rollout.complete", record)
            log.info("rollout %s completed", rollout.id)
            return
        rollout.current_stage = idx + 1
        rollout.stage_started_at = now
        rollout.soak_until = None
        audit(session, ENGINE, "rollout.promote", "rollout", rollout.id, record)
        log.info("rollout %s promoted to stage %d", rollout.id, idx + 2)
        if stage.pause_after:
            # an approval: nobody of the next stage is told until an operator resumes the rollout
            reason = f"{APPROVAL_REASON} stage {idx + 2} (stage {idx + 1} passed its gates)"
            service.transition(rollout, RolloutStatus.paused, ENGINE, "rollout.pause", {"reason": reason})
            rollout.reason = reason

    def _tripped(
        self,
        repo: RolloutRepository,
        service: RolloutService,
        rollout: Rollout,
        idx: int,
        gates: Gates,
        counts: StageCounts,
    ) -> bool:
        """Fail the rollout if the stage's failures already exceed what its gates allow."""
        if not early_trip(gates, counts, counts.total):
            return False
        failed = repo.member_rows(rollout.id, idx, sorted(FAILED))
        why = sorted({f"{d}: {p.value}: {r}" for d, p, r in failed})
        self._fail(
            service,
            rollout,
            f"stage {idx + 1}: {counts.failed} of {counts.total} devices failed ({'; '.join(why[:3])})",
            {"stage": idx, "passed": False, "numbers": asdict(counts), "devices": why[:20]},
        )
        return True

    @staticmethod
    def _counts(groups: list[tuple[bool, P, DeviceStatus, bool, int]], mode: ServeMode) -> TickCounts:
        """:class:`TickCounts` from :meth:`RolloutRepository.tick_counts`."""
        succeeded = failed = in_flight = offline = total = busy = pending_online = pending_offline = 0
        for member, phase, status, shadow, n in groups:
            online = status == DeviceStatus.online
            if phase in IN_FLIGHT and online:
                busy += n
            if not member or phase == P.cancelled:
                continue  # a cancelled deployment (its device decommissioned) left the stage
            total += n
            stale_shadow = mode == ServeMode.serve and shadow
            if phase == P.pending or (phase == P.succeeded and stale_shadow):
                if online:
                    pending_online += n
                else:
                    pending_offline += n
            if phase == P.succeeded and not stale_shadow:
                succeeded += n
            elif phase in FAILED:
                failed += n
            elif online or phase in STARTED:
                # a device that began the update and then looks offline (its will fired, the broker
                # restarted) is still updating: it blocks the stage until it reports or times out
                in_flight += n
            else:
                offline += n
        counts = StageCounts(
            total=total, succeeded=succeeded, failed=failed, in_flight=in_flight, offline_waiting=offline
        )
        return TickCounts(counts, busy, pending_online, pending_offline)

    def _notify(
        self, session: Session, rollout: Rollout, rows: list[Any], mode: ServeMode, now: datetime
    ) -> None:
        """Sign a DesiredState for each deployment row (:meth:`RolloutRepository.to_notify`) and
        mark them notified: a few bulk statements, no ORM object per device."""
        self._signed = True
        probation = Probation.model_validate(rollout.probation)
        targets = [
            DeviceTarget(r.device_id, r.status, r.arch, r.hardware or {}, r.desired_seq or 0) for r in rows
        ]
        seqs, errors = DesiredStateService(session, self.ctx).assign_many(
            targets, rollout.model, rollout.version, mode=mode, probation=probation, rollout_id=rollout.id,
            routing=routing_of(rollout),
        )  # fmt: skip
        notified, failed = [], []
        for row in rows:
            if row.device_id in errors:
                failed.append(
                    {"id": row.id, "phase": P.failed, "reason": f"not notified: {errors[row.device_id]}"}
                )
                continue
            # a shadow deployment that passed is re-armed to serve: an explicit engine decision,
            # not a device-reported transition, so it bypasses the deployment machine on purpose
            details = {**(row.details or {}), "mode": mode.value}
            notified.append({"id": row.id, "phase": P.notified, "desired_seq": seqs[row.device_id],
                             "notified_at": now, "details": details})  # fmt: skip
        DeploymentRepository(session).update_many(notified)
        DeploymentRepository(session).update_many(failed)

    def _fail(self, service: RolloutService, rollout: Rollout, reason: str, verdict: dict[str, Any]) -> None:
        log.warning("rollout %s: %s (on_failure=%s)", rollout.id, reason, rollout.on_failure)
        if rollout.on_failure == "rollback":
            service.begin_rollback(rollout, ENGINE, reason, verdict)
        else:
            service.transition(rollout, RolloutStatus.paused, ENGINE, "rollout.pause", {"reason": reason})
            rollout.reason = reason
            rollout.verdict = verdict

    # -- rolling back --------------------------------------------------------------------------
    def _advance_rollback(self, session: Session, rollout: Rollout, now: datetime) -> None:
        rows = RolloutRepository(session).deployments(rollout.id)
        waiting = 0
        for dep, status, serving in rows:
            if "rollback_seq" not in (dep.details or {}):
                continue
            if serving.get(rollout.model) == dep.previous_version:
                if settle_phase(dep, P.rolled_back):
                    dep.reason = dep.reason or "returned to the previous version by the rollout"
            elif status == DeviceStatus.online and dep.phase != P.rolled_back:
                waiting += 1
        started = rollout.rollback_started_at or rollout.updated_at
        overdue = now - started > timedelta(seconds=rollout.device_timeout_s)
        if waiting == 0 or overdue:
            service = RolloutService(session, self.ctx)
            details = {"unconfirmed_devices": waiting} if waiting else {}
            service.transition(rollout, RolloutStatus.rolled_back, ENGINE, "rollout.rolled_back", details)
            log.info("rollout %s rolled back%s", rollout.id, f" ({waiting} unconfirmed)" if waiting else "")
