"""Reports of deployment phases (:class:`Reporter`): journaled before they are sent, under a report
seq persisted with the state, so a kill at any point neither loses a report nor reuses its seq;
an outcome keeps its seq across retries and restarts until it is reported and cleared."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..mqtt import MqttLink, ReportJournal
from ..protocol import DeploymentPhase, Report, TopicKind, device_topic
from ..protocol.messages import utcnow
from ..state import OUTCOMES, DeviceState, allocate_report_seq, finish
from .persistence import StateKeeper

log = logging.getLogger(__name__)


def now_ms() -> int:
    """The wall clock in ms: where device-monotonic seqs start when nothing on disk says more."""
    return int(time.time() * 1000)


class Reporter:
    """Sends the device's reports; ``link`` is set once the daemon connects MQTT."""

    def __init__(self, device_id: str, keeper: StateKeeper, journal: ReportJournal) -> None:
        self.device_id = device_id
        self.keeper = keeper
        self.journal = journal
        self.topic = device_topic(device_id, TopicKind.report)
        self.link: MqttLink | None = None
        #: details of the outcome being reported, kept while its reporting is retried
        self.outcome_details: dict[str, Any] | None = None

    def seq_floor(self, state: DeviceState, *, state_lost: bool) -> DeviceState:
        """``state`` with its report seq above every journaled report and, if no state file
        survived (``state_lost``), above the wall clock in ms: the server drops seq <= last seen."""
        floor = self.journal.max_seq()
        if state_lost:
            floor = max(floor, now_ms())
        if floor > state.report_seq:
            state = state.model_copy(update={"report_seq": floor})
        return state

    def send(
        self,
        phase: DeploymentPhase,
        *,
        desired_seq: int | None,
        rollout_id: str | None = None,
        model: str | None = None,
        version: str | None = None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        seq: int | None = None,
        state: DeviceState | None = None,
    ) -> int:
        """Report ``phase`` (with ``seq``: an outcome's, already persisted; ``state`` is unused).

        Without ``seq`` a new report seq is allocated and persisted together with ``state``
        (default: the current state; e.g. the seq of a desired state handled without an update) in
        ONE commit, made after the report is journaled: a kill before the journal write changes
        nothing (the retained desired state is handled again after the restart), a kill after it
        leaves the report in the journal, which is re-sent (and keeps the report seq above it).
        Committing first would lose the report to such a kill."""
        assert self.link is not None
        keeper = self.keeper
        fields = (desired_seq, rollout_id, model, version, reason, details)
        if seq is not None:  # an outcome: its seq is persisted already
            self.link.publish_report(seq, self.topic, self._build(phase, seq, *fields, keeper.state))
            return seq
        state, seq = allocate_report_seq(keeper.state if state is None else state)
        self.journal.append(seq, self.topic, self._build(phase, seq, *fields, state))
        try:
            keeper.commit(state)
        except BaseException:
            # the journaled report goes out (it may be in flight already): never reuse its seq
            report_seq = max(keeper.state.report_seq, seq)
            keeper.keep_unsaved(keeper.state.model_copy(update={"report_seq": report_seq}))
            raise
        self.link.flush()
        return seq

    def _build(
        self,
        phase: DeploymentPhase,
        seq: int,
        desired_seq: int | None,
        rollout_id: str | None,
        model: str | None,
        version: str | None,
        reason: str | None,
        details: dict[str, Any] | None,
        state: DeviceState,
    ) -> bytes:
        report = Report.build(
            device_id=self.device_id,
            seq=seq,
            at=utcnow(),
            phase=phase,
            desired_seq=desired_seq,
            rollout_id=rollout_id,
            model=model,
            version=version,
            reason=reason[:2000] if reason else None,
            details=details or {},
            serving=state.serving(),
        )
        log.info(
            "report %d: %s %s %s desired_seq=%s%s",
            seq,
            phase.value,
            model or "",
            version or "",
            desired_seq,
            f" ({reason})" if reason else "",
        )
        return report.to_json()

    def report_update(self, details: dict[str, Any] | None = None, *, seq: int | None = None) -> None:
        """Report the phase of the update in flight."""
        upd = self.keeper.state.update
        assert upd is not None
        self.send(
            DeploymentPhase(upd.phase.value),
            desired_seq=upd.desired_seq,
            rollout_id=upd.desired.get("rollout_id"),
            model=upd.model,
            version=upd.version,
            reason=upd.reason,
            details=details,
            seq=seq,
        )

    def advance(self, state: DeviceState, details: dict[str, Any] | None = None) -> None:
        """Persist ``state``, then report its phase (an outcome is reported and cleared)."""
        self.keeper.commit(state)
        upd = state.update
        assert upd is not None
        if upd.phase in OUTCOMES:
            self.finish_outcome(details)
        else:
            self.report_update(details)

    def finish_outcome(self, details: dict[str, Any] | None = None) -> None:
        """Report the outcome (under the seq it keeps across retries and restarts) and clear it.
        A save that fails leaves the outcome in place; the worker retries with the same details."""
        keeper = self.keeper
        upd = keeper.state.update
        assert upd is not None
        assert upd.phase in OUTCOMES
        if details is None:
            details = self.outcome_details
        self.outcome_details = details
        seq = upd.outcome_report_seq
        if seq is None:
            state, seq = allocate_report_seq(keeper.state)
            assert state.update is not None
            state = state.model_copy(
                update={"update": state.update.model_copy(update={"outcome_report_seq": seq})}
            )
            keeper.commit(state)
        self.report_update(details, seq=seq)
        keeper.commit(finish(keeper.state))
        self.outcome_details = None
        try:
            keeper.store.gc(keeper.state)
        except OSError as exc:
            log.warning("garbage collection failed: %s", exc)
