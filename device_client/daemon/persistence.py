"""The device state in memory and on disk (:class:`StateKeeper`): every decision reads it, every
change is saved before it is adopted, and a save that fails where nothing else retries it is
remembered for the worker to retry. Watchers follow every adopted state (the routing table)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..protocol import DesiredState
from ..state import DeviceState
from ..store import StateStore, StoreError

log = logging.getLogger(__name__)


class StateKeeper:
    """The one :class:`~device_client.state.DeviceState` the daemon acts on, and its store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.state = DeviceState()
        #: ``state`` is newer than the file: a start-up commit failed, or the report seq of a report
        #: journaled before its commit failed; the worker retries the save (:meth:`save_unsaved`)
        self.unsaved = False
        #: called with every state adopted, on the thread that adopts it; a watcher that raises is
        #: logged and changes nothing (the state is adopted already)
        self.watchers: list[Callable[[DeviceState], None]] = []

    def commit(self, state: DeviceState) -> None:
        """Save ``state``, then adopt it (a failed save changes nothing in memory)."""
        self.store.save(state)
        self.state = state
        self.unsaved = False
        self._notify(state)

    def _notify(self, state: DeviceState) -> None:
        for watcher in self.watchers:
            try:
                watcher(state)
            except Exception:
                log.exception("a state watcher failed")

    def commit_at_start(self, state: DeviceState, what: str) -> None:
        """Commit at start-up, where a failed save (full disk) must not keep the daemon from
        serving: keep ``state`` in memory and let the worker retry the save."""
        try:
            self.commit(state)
        except (OSError, StoreError) as exc:
            log.error("cannot persist %s at start-up (retrying in the background): %s", what, exc)
            self.keep_unsaved(state)

    def keep_unsaved(self, state: DeviceState) -> None:
        """Adopt ``state`` although it could not be saved; the worker saves it later."""
        self.state = state
        self.unsaved = True
        self._notify(state)

    def save_unsaved(self) -> None:
        """Retry a save that failed where nothing else retries it; quietly: the failure was logged."""
        try:
            self.commit(self.state)
        except (OSError, StoreError) as exc:
            log.debug("state still not saved: %s", exc)
            return
        log.info("the state is saved again")

    def desired(self) -> DesiredState:
        """The DesiredState of the update in flight."""
        assert self.state.update is not None
        return DesiredState.model_validate(self.state.update.desired)
