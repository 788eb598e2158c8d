"""The worker (:class:`Worker`): the ONE thread that makes every decision and every state
transition, taking the next desired state or the next step of the update in flight; no message
and no exception in a step can stop it."""

from __future__ import annotations

import logging
import threading

from ..config import DeviceSettings
from ..state import OUTCOMES, UpdatePhase
from ..store import DiskFull, StoreError
from .intake import Intake
from .persistence import StateKeeper
from .probation import Probation
from .reporting import Reporter
from .updater import DISK_FULL_ERRNOS, StepFailed, Updater

log = logging.getLogger(__name__)

#: phases whose unexpected exceptions fail the update (nothing new serves yet)
_FAILABLE = frozenset({UpdatePhase.downloading, UpdatePhase.verifying, UpdatePhase.installing})


class Worker:
    """One pass of the worker's loop is :meth:`run_once`.

    Failures at any step (network, hash, unsafe bundle, full disk, rejected model) end in
    ``failed`` with the reason while the current model keeps serving; an unexpected exception while
    downloading, verifying or installing fails the update (``internal_error: ...``) rather than
    retrying it unreported. In probation or with an outcome to report there is nothing to fail: a
    save that fails there is retried every tick, warned about once (:attr:`save_warned`)."""

    def __init__(
        self,
        *,
        settings: DeviceSettings,
        keeper: StateKeeper,
        intake: Intake,
        updater: Updater,
        probation: Probation,
        reporter: Reporter,
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.keeper = keeper
        self.intake = intake
        self.updater = updater
        self.probation = probation
        self.reporter = reporter
        self.stop = stop
        #: a retry-only step (probation revert, outcome report) failed to save: warned once
        self.save_warned = False

    def run_once(self) -> None:
        if self.keeper.unsaved:
            self.keeper.save_unsaved()
        payload = self._next_message()
        if payload is not None:
            self.intake.handle(payload)
        elif self.keeper.state.update is not None:
            self.step()

    def _next_message(self) -> bytes | None:
        """The next queued desired state, or None to take a step of the update in flight.

        None while ``installing``: an install cannot be cancelled (no such transition), so a newer
        desired state stays queued until the update reaches probation, where it supersedes it."""
        upd = self.keeper.state.update
        if upd is not None and upd.phase is UpdatePhase.installing:
            return None
        if self.probation.pending is not None:  # a breach is being reverted: nothing may cancel it
            self.stop.wait(self.settings.probation_tick_s)
            return None
        if upd is None:
            wait = 0.5
        elif upd.phase is UpdatePhase.probation:
            wait = self.settings.probation_tick_s
        else:
            wait = 0.0
        return self.intake.take(wait)

    def step(self) -> None:
        """Take the next step of the update in flight."""
        keeper = self.keeper
        upd = keeper.state.update
        assert upd is not None
        try:
            if upd.phase is UpdatePhase.downloading:
                self.updater.download()
            elif upd.phase is UpdatePhase.verifying:
                self.updater.verify()
            elif upd.phase is UpdatePhase.installing:
                self.updater.install()
            elif upd.phase is UpdatePhase.probation:
                self.probation.tick()
            elif upd.phase in OUTCOMES:
                self.reporter.finish_outcome()
            if self.save_warned and not keeper.unsaved and self.probation.pending is None:
                self.save_warned = False
                log.info("the state is saved again")
        except StepFailed as exc:
            self.updater.fail(exc.reason, exc.details)
        except Exception as exc:
            # In probation or with an outcome to report there is nothing to fail (a serve-mode
            # probation can only be reverted): the state did not change, the worker retries the
            # step after a pause (a full disk: until space is free).
            if keeper.state.phase not in _FAILABLE:
                if not isinstance(exc, (StoreError, OSError)):
                    raise
                # a save (or the report journal's write) that fails: retried every tick, so
                # warned once (not a traceback a second), then quietly until it succeeds
                if self.save_warned:
                    log.debug("%s %s: still cannot save: %s", upd.phase.value, upd.version, exc)
                else:
                    log.warning(
                        "%s %s: cannot save the state (retrying until it can): %s",
                        upd.phase.value,
                        upd.version,
                        exc,
                    )
                    self.save_warned = True
                self.stop.wait(1.0)
                return
            if isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS):
                self.updater.fail(f"disk_full: {exc}")
                return
            # anything else (EIO/EROFS from the disk, a bug) before the candidate serves: retrying
            # every second would wedge the update unreported; fail it, the current model serves on
            log.exception("unexpected error while %s %s", keeper.state.phase.value, upd.version)
            self.updater.fail(f"internal_error: {exc.__class__.__name__}: {exc}")
