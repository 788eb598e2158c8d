"""The model hosts, one per model name, and the slots they serve from (:class:`Slots`): loading at
start-up with its fallback to the previous model, warm or cold previous models, rollback of a host,
and which installed slot can stand in for a download."""

from __future__ import annotations

import logging

from ..config import DeviceSettings
from ..protocol import DesiredState
from ..runtime import ModelHost, ModelRejected, NoModel
from ..state import Slot
from .persistence import StateKeeper

log = logging.getLogger(__name__)


class Slots:
    """``hosts`` is the dict the local inference API serves from (shared, never replaced)."""

    def __init__(self, settings: DeviceSettings, keeper: StateKeeper) -> None:
        self.settings = settings
        self.keeper = keeper
        self.store = keeper.store
        self.hosts: dict[str, ModelHost] = {}
        #: slot paths that did not load at start-up (intact bundle.json, damaged model files):
        #: never reused by an install of that version, which extracts the bundle over them
        self.broken: set[str] = set()

    def new_host(self, model: str) -> ModelHost:
        return ModelHost.from_settings(model, self.settings)

    def load_all(self) -> None:
        """At start-up: the serving model of each model name, plus the previous one (warm when
        ``keep_previous_warm``, else cold), plus a shadow that passed its probation. A current slot
        that no longer loads falls back to the previous one, which becomes current; else nothing
        serves that model."""
        state = self.keeper.state
        for model, slot in state.current.items():
            host = self.new_host(model)
            prev = state.previous.get(model)
            try:
                host.install(self.store.slot_dir(slot))
            except Exception as exc:  # a damaged slot must not keep the daemon from starting
                log.error("cannot load serving model %s %s: %s", model, slot.version, exc)
                self.broken.add(slot.path)
                if prev is None or prev.path == slot.path or not self._fall_back(host, model, prev):
                    log.error("no %s model serves", model)
                    continue
                prev = None  # it serves now
            self.hosts[model] = host
            if prev is not None and prev.path != slot.path:
                self.set_previous(host, prev)
            shadow = state.shadow.get(model)
            if shadow is not None:
                try:
                    host.start_shadow(host.load(self.store.slot_dir(shadow)))
                except Exception as exc:
                    log.error("cannot load shadow %s %s: %s", model, shadow.version, exc)

    def _fall_back(self, host: ModelHost, model: str, prev: Slot) -> bool:
        """At start-up the current slot does not load: serve the previous one (and persist that it
        is current again, with no previous), as a revert would."""
        try:
            host.install(self.store.slot_dir(prev))
        except Exception as exc:
            log.error("cannot load the previous model %s %s either: %s", model, prev.version, exc)
            self.broken.add(prev.path)
            return False
        log.warning("serving the previous model %s %s instead", model, prev.version)
        state = self.keeper.state
        current = {**state.current, model: prev}
        previous = {k: v for k, v in state.previous.items() if k != model}
        state = state.model_copy(update={"current": current, "previous": previous})
        self.keeper.commit_at_start(state, f"the fallback to {model} {prev.version}")
        return True

    def set_previous(self, host: ModelHost, slot: Slot | None) -> None:
        """Warm or cold previous model per ``keep_previous_warm`` (see :class:`ModelHost`)."""
        if slot is None:
            host.set_previous(None)
            return
        path = self.store.slot_dir(slot)
        if not self.settings.keep_previous_warm:
            host.set_previous(path)
            return
        try:
            host.set_previous(host.load(path))
        except ModelRejected as exc:
            log.error("previous model %s %s does not load: %s", slot.model, slot.version, exc.reason)
            host.set_previous(None)

    def rollback_host(self, host: ModelHost, model: str) -> str | None:
        """Serve the previous model again; if there is none, or it is cold and no longer loads,
        serve nothing rather than the model being rolled back (returns why, in that case)."""
        try:
            host.rollback()
            return None
        except NoModel:  # a first install has nothing to go back to: stop serving it
            problem = None
        except ModelRejected as exc:
            log.error("%s: the previous model does not load (%s); serving no %s model", model, exc, model)
            problem = f"the previous model does not load: {exc.reason}"
        self.hosts.pop(model, None)
        host.close()
        return problem

    def restore_previous(self, model: str) -> None:
        """After a rollback: the host's previous model is the one the state names again."""
        if model in self.hosts:
            self.set_previous(self.hosts[model], self.keeper.state.previous.get(model))

    def serves(self, slot: Slot) -> bool:
        """Whether ``slot`` really serves now (not only named current: a current slot that did not
        load at start-up with no previous to fall back to serves nothing; installing it again then
        reports the truth)."""
        host = self.hosts.get(slot.model)
        serving = host.serving if host is not None else None
        return serving is not None and serving.path == self.store.slot_dir(slot)

    def installed_slot(self, d: DesiredState) -> Slot | None:
        """An intact slot already holding exactly this bundle (e.g. the previous version); not one
        that failed to load at start-up (its bundle.json may be intact, its model files are not)."""
        state = self.keeper.state
        for slot in (state.previous.get(d.model), state.current.get(d.model)):
            if (
                slot is not None
                and slot.path not in self.broken
                and (slot.version, slot.release, slot.variant) == (d.version, d.release, d.variant)
                and (self.store.slot_dir(slot) / "bundle.json").exists()
            ):
                return slot
        return None

    def stop_shadow(self, model: str, *, persist: bool = True) -> None:
        """Stop shadowing ``model`` (and, with ``persist``, forget the shadow slot in the state)."""
        host = self.hosts.get(model)
        if host is not None and host.shadow_candidate is not None:
            host.stop_shadow()
        state = self.keeper.state
        if persist and model in state.shadow:
            shadow = dict(state.shadow)
            shadow.pop(model)
            self.keeper.commit(state.model_copy(update={"shadow": shadow}))

    def close(self) -> None:
        for host in list(self.hosts.values()):
            host.close()
