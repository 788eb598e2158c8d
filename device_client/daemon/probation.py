"""Probation of an installed update (:class:`Probation`): serve-mode and shadow ticks judged by
``health.evaluate_probation``, a pass that raises the release floor, and a breach that rolls back
to the last known good model (:class:`PendingBreach` until its outcome is saved)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..health import ProbationOutcome, WindowStats, evaluate_probation
from ..protocol import DesiredState, ServeMode
from ..protocol.messages import utcnow
from ..runtime import ModelHost
from ..state import fail, passed, revert
from .models import Slots
from .persistence import StateKeeper
from .reporting import Reporter

log = logging.getLogger(__name__)


@dataclass
class PendingBreach:
    """A probation breach whose outcome is not persisted yet: retried every tick, never re-judged."""

    reason: str
    details: dict[str, Any]
    #: the host already flipped back to the previous model (only the save is retried)
    flipped: bool = False


class Probation:
    """6. ``probation``: every ``probation_tick_s`` the worker judges ``HealthRecorder.since_mark``
    against the desired state's probation (baseline: the outgoing model's p95). A pass reports
    ``succeeded`` and raises the release floor; a breach persists ``rolled_back`` and flips back to
    the previous model, reported with the numbers. Shadow mode judges the candidate's own errors
    and latency (p95 against the serving model's), never swaps, and after a pass keeps shadowing
    (persisted in ``state.shadow``) until the next desired state. A rollback whose cold previous
    model no longer loads serves nothing for that model (``rollback_error`` in the details)."""

    def __init__(self, *, keeper: StateKeeper, reporter: Reporter, slots: Slots) -> None:
        self.keeper = keeper
        self.reporter = reporter
        self.slots = slots
        #: a breach being reverted: nothing may cancel the update meanwhile
        self.pending: PendingBreach | None = None

    def tick(self) -> None:
        keeper = self.keeper
        upd = keeper.state.update
        assert upd is not None
        assert upd.probation_started_at is not None
        d = keeper.desired()
        host = self.slots.hosts.get(upd.model)
        now = utcnow()
        elapsed = (now - upd.probation_started_at).total_seconds()
        if self.pending is not None:  # a breach whose outcome could not be saved yet
            self._revert_breach(host)  # (its flip may have dropped the host: a first install)
            return
        if host is None:  # cannot happen unless the model vanished; nothing serves it
            self.reporter.advance(revert(keeper.state, now, "probation: the model host is gone"))
            return
        stats = host.health.since_mark()
        if upd.mode is ServeMode.shadow:
            self._shadow_tick(host, stats, d, elapsed, now)
            return
        verdict = evaluate_probation(stats, d.probation, upd.baseline_p95_ms, elapsed)
        if verdict.outcome is ProbationOutcome.continue_:
            return
        details = {"probation": verdict.numbers, "reasons": list(verdict.reasons)}
        if verdict.outcome is ProbationOutcome.passed:
            self.reporter.advance(passed(keeper.state, now), details)
            return
        self.pending = PendingBreach(f"probation_failed: {verdict.reason}", details)
        self._revert_breach(host)

    def _shadow_tick(
        self, host: ModelHost, stats: WindowStats, d: DesiredState, elapsed: float, now: datetime
    ) -> None:
        upd = self.keeper.state.update
        assert upd is not None
        verdict = evaluate_probation(stats.shadow_candidate(), d.probation, upd.baseline_p95_ms, elapsed)
        if verdict.outcome is ProbationOutcome.continue_:
            return
        numbers = dict(verdict.numbers)
        numbers.update(agreement=stats.agreement, shadow_dropped=stats.shadow_dropped)
        details = {"probation": numbers, "reasons": list(verdict.reasons)}
        if verdict.outcome is ProbationOutcome.passed:
            state = passed(self.keeper.state, now)
            assert upd.candidate is not None
            state = state.model_copy(update={"shadow": {**state.shadow, upd.model: upd.candidate}})
            self.reporter.advance(state, details)
            return
        self.pending = PendingBreach(f"shadow_failed: {verdict.reason}", details)
        self._revert_breach(host)

    def _revert_breach(self, host: ModelHost | None) -> None:
        """End a probation that breached (:attr:`pending`).

        Serve mode flips the host back to the previous model FIRST, then commits ``rolled_back``
        (current = the last known good model): the breaching candidate stops answering callers at
        once, even when the save fails (full disk). A crash between the flip and the commit is
        recovered as a crash during probation, i.e. reverted as well. A save that fails leaves
        the breach ``flipped``, and the next tick retries only the save (never the flip: a second
        rollback would find no previous model and drop the host), never re-evaluating the verdict
        (the health window would measure the good model). Shadow mode commits ``failed`` before it
        stops the shadow (the shadow candidate answers no caller)."""
        keeper = self.keeper
        upd = keeper.state.update
        assert upd is not None
        breach = self.pending
        assert breach is not None
        now = utcnow()
        if upd.mode is ServeMode.shadow:
            keeper.commit(fail(keeper.state, now, breach.reason))
            self.pending = None
            if host is not None:
                host.stop_shadow()
            self.reporter.finish_outcome(breach.details)
            return
        if not breach.flipped:
            if host is not None:
                problem = self.slots.rollback_host(host, upd.model)
                if problem:
                    breach.details["rollback_error"] = problem
            breach.flipped = True
        keeper.commit(revert(keeper.state, now, breach.reason))
        self.pending = None
        self.slots.restore_previous(upd.model)
        self.reporter.finish_outcome(breach.details)
