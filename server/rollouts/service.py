"""Rollouts: creation (with validation), operator actions, and the status view."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from device_client.protocol.messages import DeploymentPhase, Probation
from device_client.protocol.routing import RoutingPolicy
from server.admin.schemas import Principal
from server.admin.service import audit
from server.catalog.repository import CatalogRepository
from server.db import utcnow
from server.devices.repository import DeviceRepository
from server.devices.tables import Device, DeviceStatus
from server.devices.tags import check_tags
from server.errors import Conflict, Invalid, NotFound, SeqRace
from server.health.repository import HealthWindowRepository, WindowMatch
from server.health.series import fold_series, health_rows_of
from server.health.sums import DeviceHealth
from server.rollouts.desired import DesiredStateService, count_variants
from server.rollouts.desired_repository import DesiredRepository
from server.rollouts.machine import IllegalTransition, can_deploy, deployment_transition, rollout_transition
from server.rollouts.policy import Gates, HealthAggregate, Stage, assign_stages, check_stages, robust_health
from server.rollouts.repository import DeploymentRepository, RolloutRepository
from server.rollouts.routing import PreviousRouting, policy_key
from server.rollouts.routing_check import RoutingCheck
from server.rollouts.schemas import (
    HealthSeries,
    RolloutCreate,
    RolloutDetail,
    RolloutHealth,
    RolloutOut,
    Selector,
    StageView,
)
from server.rollouts.tables import Deployment, DesiredRecord, Rollout, RolloutStatus
from server.rollouts.variants import by_variant, variant_summary
from server.security import new_id

if TYPE_CHECKING:
    from server.context import ServerContext

#: how far back health windows count as a device's pre-rollout baseline
BASELINE_WINDOW = timedelta(minutes=15)
#: a rollback returns a device to the version it ran before: judging that known-good version on
#: probation could only bounce the device back to the bad one, so its probation passes at once
ROLLBACK_PROBATION = Probation(seconds=0, min_requests=0, max_error_rate=1.0)
#: phases of a device that has been sent the new version and may run it: a rollback sends it back
#: whatever its DesiredState names now; a device in another phase that was told of the version (it
#: reverted on its own, failed, was cancelled) runs the previous one, and gets it named again only
#: if its DesiredState still names the new version (a re-sign would otherwise install that again)
TOUCHED = frozenset({
    DeploymentPhase.notified, DeploymentPhase.downloading, DeploymentPhase.verifying,
    DeploymentPhase.installing, DeploymentPhase.probation, DeploymentPhase.succeeded,
    DeploymentPhase.timed_out,
})  # fmt: skip


#: the key of a rollout's stored selector (``rollouts.selector``) that records the devices
#: ``skip_unfit`` left out: ``{count, examples}``; shown as ``unfit_skipped`` and its examples
UNFIT_KEY = "skipped_unfit"
#: device ids kept as examples of those no variant fits
UNFIT_EXAMPLES = 20


def rollout_out(r: Rollout) -> RolloutOut:
    selector = dict(r.selector or {})
    skipped = selector.pop(UNFIT_KEY, None) or {}
    return RolloutOut(
        id=r.id, model=r.model, version=r.version, status=r.status, selector=selector, stages=r.stages,
        unfit_skipped=int(skipped.get("count", 0)), unfit_skipped_examples=list(skipped.get("examples", [])),
        gates=r.gates, probation=r.probation, on_failure=r.on_failure,
        max_concurrent_downloads=r.max_concurrent_downloads, device_timeout_s=r.device_timeout_s,
        current_stage=r.current_stage, stage_started_at=r.stage_started_at,
        rollback_started_at=r.rollback_started_at, soak_until=r.soak_until,
        reason=r.reason, verdict=r.verdict or {}, created_at=r.created_at, updated_at=r.updated_at,
        finished_at=r.finished_at, created_by=r.created_by, routing=r.routing,
    )  # fmt: skip


def select_devices(session: Session, selector: Selector) -> list[Any]:
    """Rows (id, arch, hardware, serving) of the devices (not decommissioned) matching every criterion
    of ``selector``, by id."""
    check_tags(selector.tags)
    hw = selector.hardware
    devices = DeviceRepository(session).candidates(selector.tags, selector.device_ids, hw.arch)
    result = []
    for d in devices:
        facts = d.hardware or {}
        if hw.min_ram_mb is not None and int(facts.get("ram_mb", 0)) < hw.min_ram_mb:
            continue
        if any(p not in (facts.get("execution_providers") or []) for p in hw.providers):
            continue
        result.append(d)
    return result


class RolloutService:
    def __init__(self, session: Session, ctx: ServerContext) -> None:
        self.session = session
        self.ctx = ctx
        self.rollouts = RolloutRepository(session)

    # -- create --------------------------------------------------------------------------------
    def create(self, body: RolloutCreate, by: Principal) -> RolloutDetail:
        version = CatalogRepository(self.session).active_version(body.model, body.version)
        if version is None:
            raise NotFound(f"no active version {body.version!r} of model {body.model!r}")
        routing, warnings = RoutingCheck(self.session).check(body, version.id)
        devices = select_devices(self.session, body.selector)
        if not devices:
            raise Invalid("the selector matches no device")
        devices, skipped = self._fitting(body, version.id, devices)
        try:
            stages, sizes = check_stages(body.stages, len(devices))
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        # two creations for one model (a CLI retry after a timeout, two operators) must not both
        # pass the conflict check: they take turns from here to their commit
        self.rollouts.serialize_creation(body.model)
        conflicts = self.rollouts.conflicting(body.model, [d.id for d in devices])
        if conflicts:
            rid, did = conflicts[0]
            raise Conflict(
                f"device {did!r} is already in rollout {rid} of model {body.model!r}; "
                "finish, abort or roll back that rollout first"
            )
        # what each device's DesiredState carries now: what a rollback restores (each policy once)
        held = DesiredRepository(self.session).routing_of([d.id for d in devices], body.model)
        previous = {policy_key(p): p for p in held.values()}
        rollout = self.rollouts.add(
            Rollout(
                id=new_id(), model=body.model, version=body.version, status=RolloutStatus.draft,
                selector=body.selector.model_dump(mode="json") | skipped,
                stages=[s.model_dump(mode="json") for s in stages],
                gates=body.gates.model_dump(mode="json"), probation=body.probation.model_dump(mode="json"),
                on_failure=body.on_failure, max_concurrent_downloads=body.max_concurrent_downloads,
                device_timeout_s=body.device_timeout_s, created_by=by.actor, verdict={},
                routing=None if routing is None else routing.to_dict(), previous_routing=previous,
            )
        )  # fmt: skip
        stage_of = assign_stages(rollout.id, [d.id for d in devices], sizes)
        now = utcnow()
        DeploymentRepository(self.session).insert_many([
            {"rollout_id": rollout.id, "device_id": d.id, "stage": stage_of[d.id], "model": body.model,
             "version": body.version, "previous_version": (d.serving or {}).get(body.model),
             "phase": DeploymentPhase.pending, "created_at": now, "updated_at": now,
             "details": {"previous_routing": policy_key(held[d.id])} if d.id in held else {}}
            for d in devices
        ])  # fmt: skip
        if routing is None and held:
            warnings.append(
                f"{len(held)} of the selected devices run under a routing policy and this rollout carries "
                "none: they will answer at the edge alone (give the policy again to keep it)"
            )
        details: dict[str, Any] = {
            "model": body.model, "version": body.version, "devices": len(devices), "stage_sizes": sizes,
        } | skipped  # fmt: skip
        if len(stages) < len(body.stages):  # percent stages that resolved to the same devices, merged
            details["stages_requested"] = [s.model_dump(mode="json") for s in body.stages]
        if routing is not None:
            details["routing"] = policy_key(rollout.routing or {})
        audit(self.session, by, "rollout.create", "rollout", rollout.id, details)
        if body.start:
            self.transition(rollout, RolloutStatus.running, by, "rollout.start")
            rollout.stage_started_at = utcnow()
        detail = self.detail(rollout.id)
        detail.warnings = self._soak_warnings(stages, [d.id for d in devices], now) + warnings
        if skipped:
            left = skipped[UNFIT_KEY]
            detail.warnings.append(
                f"{left['count']} selected device(s) fit no variant of {body.model} {body.version} and "
                f"are left out of the rollout (skip_unfit; e.g. {', '.join(left['examples'][:5])})"
            )
        return detail

    def _fitting(
        self, body: RolloutCreate, version_id: int, devices: list[Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """The selected devices some published variant of the version fits (the director's choice,
        :func:`server.rollouts.desired.count_variants`, as the preview counts them). Any other:
        :class:`Invalid`, unless ``skip_unfit`` leaves them out; then also what the rollout's
        selector records of them (``{UNFIT_KEY: {count, examples}}``, else ``{}``)."""
        artifacts = CatalogRepository(self.session).published_artifacts(version_id)
        _, unfit = count_variants(artifacts, devices)
        if not unfit:
            return devices, {}
        label = f"{body.model} {body.version}"
        examples = unfit[:UNFIT_EXAMPLES]
        if not body.skip_unfit:
            raise Invalid(
                f"{len(unfit)} of the {len(devices)} selected devices fit no variant of {label} "
                f"(e.g. {', '.join(examples[:5])}): push a variant they fit, narrow the selector, or "
                "give skip_unfit to leave them out; nothing was created"
            )
        left = set(unfit)
        fitting = [d for d in devices if d.id not in left]
        if not fitting:
            raise Invalid(f"none of the {len(devices)} selected devices fits a variant of {label}")
        return fitting, {UNFIT_KEY: {"count": len(unfit), "examples": examples}}

    def _soak_warnings(self, stages: list[Stage], device_ids: list[str], now: datetime) -> list[str]:
        """A stage whose soak is shorter than the devices' health window (as their recent windows
        show) lasts longer than its soak: it waits for their health reports."""
        window = HealthWindowRepository(self.session).longest_window_s(device_ids, now - BASELINE_WINDOW)
        if window is None:
            return []
        short = [(i, s.soak_s) for i, s in enumerate(stages, start=1) if s.soak_s < window]
        if not short:
            return []
        return [
            f"the soak of stage(s) {', '.join(str(i) for i, _ in short)} ({min(s for _, s in short):g}s) is "
            f"shorter than the devices' health window ({window:.3g}s): a stage is judged on the health its "
            "devices reported since it started, and waits after its soak until they have reported enough "
            "(up to stage_timeout_s), so it lasts at least one window"
        ]

    # -- actions -------------------------------------------------------------------------------
    def get(self, rollout_id: str, *, for_update: bool = False) -> Rollout:
        rollout = self.rollouts.get(rollout_id, for_update=for_update)
        if rollout is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return rollout

    def transition(
        self,
        rollout: Rollout,
        status: RolloutStatus,
        by: Principal | str,
        action: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        try:
            rollout.status = rollout_transition(rollout.status, status)
        except IllegalTransition as exc:
            raise Conflict(f"rollout {rollout.id} is {exc.src}: cannot go to {exc.dst}") from None
        if status in (RolloutStatus.completed, RolloutStatus.aborted, RolloutStatus.rolled_back):
            rollout.finished_at = utcnow()
        audit(self.session, by, action, "rollout", rollout.id, details or {})

    def start(self, rollout_id: str, by: Principal) -> RolloutDetail:
        rollout = self.get(rollout_id, for_update=True)
        self.transition(rollout, RolloutStatus.running, by, "rollout.start")
        rollout.stage_started_at = utcnow()
        return self.detail(rollout_id)

    def pause(self, rollout_id: str, by: Principal, reason: str = "paused by operator") -> RolloutDetail:
        rollout = self.get(rollout_id, for_update=True)
        self.transition(rollout, RolloutStatus.paused, by, "rollout.pause")
        rollout.reason = reason
        return self.detail(rollout_id)

    def resume(self, rollout_id: str, by: Principal) -> RolloutDetail:
        rollout = self.get(rollout_id, for_update=True)
        self.transition(rollout, RolloutStatus.running, by, "rollout.resume")
        rollout.reason = None
        rollout.soak_until = None  # re-soak the current stage
        # and judge it on health reported from now on (what made it pause is behind it)
        rollout.stage_started_at = utcnow()
        return self.detail(rollout_id)

    def promote(self, rollout_id: str, by: Principal) -> RolloutDetail:
        """Skip the rest of the current stage's soak (the gates are still evaluated)."""
        rollout = self.get(rollout_id, for_update=True)
        if rollout.status != RolloutStatus.running:
            raise Conflict(
                f"rollout {rollout.id} is {rollout.status.value}: only a running rollout can be promoted"
            )
        if rollout.soak_until is None:
            raise Conflict("the current stage has not settled yet: devices are still updating")
        rollout.soak_until = utcnow()
        audit(self.session, by, "rollout.promote", "rollout", rollout.id, {"stage": rollout.current_stage})
        return self.detail(rollout_id)

    def abort(self, rollout_id: str, by: Principal) -> RolloutDetail:
        """Stop here: pending devices are cancelled; devices keep what they have."""
        rollout = self.get(rollout_id, for_update=True)
        self.transition(rollout, RolloutStatus.aborted, by, "rollout.abort")
        for dep, _, _ in self.rollouts.deployments(rollout.id):
            if dep.phase == DeploymentPhase.pending:
                dep.phase = DeploymentPhase.cancelled
        return self.detail(rollout_id)

    def rollback(
        self,
        rollout_id: str,
        by: Principal | str,
        reason: str = "rolled back by operator",
        verdict: dict[str, Any] | None = None,
    ) -> RolloutDetail:
        rollout = self.get(rollout_id, for_update=True)
        self.begin_rollback(rollout, by, reason, verdict)
        return self.detail(rollout_id)

    def begin_rollback(
        self, rollout: Rollout, by: Principal | str, reason: str, verdict: dict[str, Any] | None = None
    ) -> int:
        """Send back to its previous version every touched device, and every other device that was
        told of the rollout's version and whose DesiredState still names it (one that reverted on
        its own or failed: a re-sign of that state would install the version again); cancel the
        pending."""
        self.transition(rollout, RolloutStatus.rolling_back, by, "rollout.rollback", {"reason": reason})
        rollout.reason = reason
        # the devices get device_timeout_s from now to confirm their way back (engine, rolling back)
        rollout.rollback_started_at = utcnow()
        if verdict is not None:
            rollout.verdict = verdict
        desired = DesiredStateService(self.session, self.ctx)
        sent = 0
        deployments = [dep for dep, _, _ in self.rollouts.deployments(rollout.id)]
        ids = [dep.device_id for dep in deployments]
        devices = {d.id: d for d in self.session.query(Device).filter(Device.id.in_(ids))}
        records = {r.device_id: r for r in desired.records.for_devices(ids)}
        restore = PreviousRouting(rollout)
        for dep in deployments:
            if dep.phase == DeploymentPhase.pending:
                dep.phase = DeploymentPhase.cancelled
                continue
            if dep.desired_seq is None:
                continue  # never told of the version (e.g. it could not be signed for the device)
            device = devices[dep.device_id]
            if dep.phase not in TOUCHED and (
                device.status == DeviceStatus.decommissioned
                or not names_rollout_version(records.get(dep.device_id), rollout)
            ):
                continue  # it does not run the version and will not be told to again
            if not dep.previous_version:
                dep.details = {**(dep.details or {}), "rollback": "no previous version to return to"}
                continue
            try:
                record = desired.assign(
                    device,
                    rollout.model,
                    dep.previous_version,
                    rollout_id=rollout.id,
                    probation=ROLLBACK_PROBATION,
                    routing=restore.of(dep),
                )
            except SeqRace:
                raise  # a state issued concurrently: the whole rollback retries (409), none skipped
            except (NotFound, Invalid, Conflict) as exc:
                dep.details = {**(dep.details or {}), "rollback": f"cannot roll back: {exc.message}"}
                continue
            dep.details = {**(dep.details or {}), "rollback_seq": record.seq}
            sent += 1
        return sent

    # -- views ---------------------------------------------------------------------------------
    def list(
        self,
        status: list[RolloutStatus] | None,
        limit: int,
        model: str | None = None,
        version: str | None = None,
    ) -> list[RolloutOut]:
        return [rollout_out(r) for r in self.rollouts.list(status, limit, model, version)]

    def detail(self, rollout_id: str) -> RolloutDetail:
        """The rollout with per-stage phases and health: the numbers the gates judge (trimmed
        per-device means, :func:`server.rollouts.policy.robust_health`), the current stage's
        since it started (or was resumed), the others' since the rollout was created."""
        rollout = self.get(rollout_id)
        self.session.flush()
        counts = self.rollouts.stage_phase_counts(rollout.id)
        health = HealthWindowRepository(self.session)
        stages = [Stage.model_validate(s) for s in rollout.stages]
        baseline = baseline_health(self.session, rollout)
        per_stage = []
        for i, stage in enumerate(stages):
            since = rollout.stage_started_at if i == rollout.current_stage else rollout.created_at
            mode = "shadow" if stage.shadow else "serve"
            match = WindowMatch(rollout.model, version=rollout.version, mode=mode, since=since)
            members = self.rollouts.members_filter(rollout.id, max_stage=i)
            per_stage.append(health.per_device_of(members, match))
        # grouped by the variant the server signed for each device, as the gates group them (never
        # by the variant a device's windows claim)
        assigned = DesiredRepository(self.session).assigned_variants(
            rollout.id, rollout.version, {d for per_device in per_stage for d in per_device}
        )
        views = []
        for i, (stage, per_device) in enumerate(zip(stages, per_stage, strict=True)):
            agg = robust_health(per_device)
            groups = by_variant(per_device, assigned)
            variants = {v: variant_summary(robust_health(g)) for v, g in groups.items()}
            views.append(StageView(
                index=i, devices=sum(n for st, _, n in counts if st <= i), shadow=stage.shadow,
                soak_s=stage.soak_s, phases=phase_totals((p, n) for st, p, n in counts if st <= i),
                health={"requests": agg.requests, "errors": agg.errors, "error_rate": agg.error_rate,
                        "p95_ms": agg.p95_ms, "agreement": agg.agreement, "devices_reporting": agg.devices,
                        "escalation_rate": agg.escalation_rate, "cloud_agreement": agg.cloud_agreement,
                        "cloud_compared": agg.cloud_compared, "cpu_ms_per_request": agg.cpu_ms_per_request,
                        "variants": variants},
            ))  # fmt: skip
        return RolloutDetail(
            **rollout_out(rollout).model_dump(),
            devices=sum(n for _, _, n in counts),
            phases=phase_totals((p, n) for _, p, n in counts),
            offline_pending=self.rollouts.offline_unfinished(rollout.id),
            stage_views=views,
            baseline={
                "requests": baseline.requests,
                "error_rate": baseline.error_rate,
                "p95_ms": baseline.p95_ms,
                "escalation_rate": baseline.escalation_rate,
                "cloud_agreement": baseline.cloud_agreement,
                "cpu_ms_per_request": baseline.cpu_ms_per_request,
            },
        )

    def health_series(self, rollout_id: str, points: int = 120) -> RolloutHealth:
        """The rollout's devices' health per version and mode in about ``points`` time buckets,
        from :data:`BASELINE_WINDOW` before it was created until now (or until it finished)."""
        rollout = self.get(rollout_id)
        since = rollout.created_at - BASELINE_WINDOW
        until = rollout.finished_at or utcnow()
        bucket_s = max(10, int((until - since).total_seconds() // points) + 1)
        rows = health_rows_of(self.session, self.rollouts.members_filter(rollout.id), rollout.model, since)
        base = baseline_health(self.session, rollout)
        baseline = {
            "requests": base.requests, "error_rate": base.error_rate, "p95_ms": base.p95_ms,
            "cpu_ms_per_request": base.cpu_ms_per_request, "escalation_rate": base.escalation_rate,
            "cloud_agreement": base.cloud_agreement,
        }  # fmt: skip
        return RolloutHealth(
            rollout_id=rollout.id, model=rollout.model, version=rollout.version, since=since,
            bucket_s=bucket_s, baseline=baseline,
            series=[HealthSeries(**s) for s in fold_series(rows, since, bucket_s)],
        )  # fmt: skip


def names_rollout_version(record: DesiredRecord | None, rollout: Rollout) -> bool:
    """Whether a device's current DesiredState is the one ``rollout`` issued for its version
    (first sent or re-signed since), i.e. what a rollback has to replace."""
    return (
        record is not None
        and record.rollout_id == rollout.id
        and (record.model, record.version) == (rollout.model, rollout.version)
    )


def gates_of(rollout: Rollout) -> Gates:
    return Gates.model_validate(rollout.gates)


def routing_of(rollout: Rollout) -> RoutingPolicy | None:
    """The routing policy the rollout's DesiredStates carry (checked when it was created)."""
    return None if rollout.routing is None else RoutingPolicy.model_validate(rollout.routing)


def phase_totals(counts: Iterable[tuple[DeploymentPhase, int]]) -> dict[str, int]:
    """Deployments per phase (from per-stage counts), in the phases' order."""
    totals: Counter[DeploymentPhase] = Counter()
    for phase, n in counts:
        totals[phase] += n
    return {p.value: totals[p] for p in DeploymentPhase if totals[p]}


def baseline_health(
    session: Session, rollout: Rollout, device_ids: list[str] | None = None
) -> HealthAggregate:
    """The health the gates compare against (:func:`baseline_per_device`, aggregated)."""
    return robust_health(baseline_per_device(session, rollout, device_ids))


def baseline_per_device(
    session: Session, rollout: Rollout, device_ids: list[str] | None = None
) -> dict[str, DeviceHealth]:
    """The same devices (``device_ids``, or all the rollout's) health before the rollout, per
    device: their ``serve`` windows in the :data:`BASELINE_WINDOW` before it was created, of other
    versions, or of its own version for the devices that already ran it (a rollout of a routing
    policy alone compares the new policy with the old one on the same version)."""
    health = HealthWindowRepository(session)
    since, until = rollout.created_at - BASELINE_WINDOW, rollout.created_at
    other = WindowMatch(rollout.model, not_version=rollout.version, mode="serve", since=since, until=until)
    own = WindowMatch(rollout.model, version=rollout.version, mode="serve", since=since, until=until)
    if device_ids is None:
        # the rollout's deployments as subqueries: nothing read or sent per device
        members = RolloutRepository.members_filter
        per_device = health.per_device_of(members(rollout.id, not_previous_version=rollout.version), other)
        per_device.update(health.per_device_of(members(rollout.id, previous_version=rollout.version), own))
        return per_device
    same = RolloutRepository(session).already_on_version(rollout) & set(device_ids)
    per_device = health.per_device(
        [d for d in device_ids if d not in same], rollout.model, not_version=rollout.version,
        mode="serve", since=since, until=until,
    )  # fmt: skip
    if same:
        per_device.update(health.per_device(
            sorted(same), rollout.model, version=rollout.version, mode="serve", since=since, until=until
        ))  # fmt: skip
    return per_device


def settle_phase(dep: Deployment, phase: DeploymentPhase) -> bool:
    """Move ``dep`` to ``phase`` if the deployment machine allows it."""
    if dep.phase == phase or not can_deploy(dep.phase, phase):
        return False
    dep.phase = deployment_transition(dep.phase, phase)
    return True
