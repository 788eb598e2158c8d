"""Intake of DesiredStates (:class:`Intake`): paho's thread only queues them; the worker verifies
each one (director signature, device id, seq, expiry, then the image repository and the release
floor) and accepts it as the next update, answers it without one (the version already serves; a
new routing policy for it is applied then), or rejects it with a report."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter
from typing import Any

from ..config import DeviceSettings
from ..protocol import DeploymentPhase, DesiredState, ServeMode
from ..protocol.messages import utcnow
from ..state import OUTCOMES, UpdatePhase, accept, cancel, set_routing
from ..trust import (
    BadSignature,
    DirectorKeyring,
    Duplicate,
    Rejected,
    RepositoryUnavailable,
    TufVerifier,
    check_release_floor,
    check_signer,
    envelope_keyids,
    verify_desired,
)
from .models import Slots
from .persistence import StateKeeper
from .reporting import Reporter

log = logging.getLogger(__name__)

#: what makes two desired states the same update (a re-issue under a new seq changes nothing)
_TARGET_KEYS = (
    "model",
    "version",
    "release",
    "variant",
    "target",
    "length",
    "hashes",
    "mode",
    "probation",
    "routing",
)


class RejectionCounts:
    """Messages on the device's topics refused since start, per reason code (thread-safe)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, code: str) -> None:
        with self._lock:
            self._counts[code] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))


class Intake:
    """Verifies and accepts DesiredStates.

    1. ``trust.verify_desired`` (signature, device id, seq, expiry). A redelivery of the accepted
       seq is ignored silently; any other rejection is reported as ``failed`` with
       ``"<code>: <why>"`` and changes nothing. Forged, unsigned, replayed, misaddressed and expired
       messages carry no ``desired_seq`` (their claims are not trusted; the claimed seq is in
       ``details``); rejections of authentic messages (TUF, release floor) carry it, so the
       deployment fails.
    2. The image repository (``trust.TufVerifier``) and the release floor. Only now may a valid
       newer desired state cancel the update in flight (reported ``cancelled``); an invalid one
       never does. An unreachable repository is retried after a backoff.

    ``supersede`` is set (on paho's thread) when a genuine newer desired state arrives during a
    download, which the download checks to stop early."""

    def __init__(
        self,
        *,
        device_id: str,
        settings: DeviceSettings,
        keyring: DirectorKeyring,
        tuf: TufVerifier,
        keeper: StateKeeper,
        reporter: Reporter,
        slots: Slots,
    ) -> None:
        self.device_id = device_id
        self.settings = settings
        self.keyring = keyring
        self.tuf = tuf
        self.keeper = keeper
        self.reporter = reporter
        self.slots = slots
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.supersede = threading.Event()
        self.rejected = RejectionCounts()

    # ---------------------------------------------------------------- paho's thread

    def on_desired(self, topic: str, payload: bytes) -> None:
        """paho thread: queue it; flag a download to stop if this is a genuine newer state.

        Newer than the last *accepted* seq, not the update's own: after a same-target re-issue the
        two differ, and the retained re-issue redelivered on every reconnect must not restart the
        download's connection. Nor must a retained desired state the device already rejected
        (``last_rejected_seq``): the worker ignores it, so it supersedes nothing."""
        self.inbox.put(payload)
        state = self.keeper.state
        upd = state.update
        if upd is not None and upd.phase is UpdatePhase.downloading:
            with contextlib.suppress(Rejected):
                desired = verify_desired(
                    payload, self.keyring.keys, self.device_id, state.last_desired_seq, utcnow()
                )
                if desired.seq != state.last_rejected_seq:
                    self.supersede.set()

    # ---------------------------------------------------------------- the worker

    def take(self, wait: float) -> bytes | None:
        """The next queued desired state, waiting up to ``wait`` seconds (0: not at all)."""
        try:
            if wait <= 0:
                return self.inbox.get_nowait()
            return self.inbox.get(timeout=wait)
        except queue.Empty:
            return None

    def handle(self, payload: bytes) -> None:
        state = self.keeper.state
        try:
            desired = self._verify_director(payload, state.last_desired_seq)
        except Duplicate:
            log.debug("redelivered desired state ignored")
            return
        except Rejected as exc:
            self._reject(exc)
            return
        if desired.seq == state.last_rejected_seq:  # the rejected retained message, redelivered
            log.debug("desired state %d was already rejected", desired.seq)
            return
        upd = state.update
        if upd is not None and _same_target(upd.desired, desired):
            if not self._signer_current(payload, desired):
                return
            log.info("desired state %d re-issues the update in flight; continuing", desired.seq)
            self.keeper.commit(state.model_copy(update={"last_desired_seq": desired.seq}))
            return
        current = state.current.get(desired.model)
        if (
            upd is None
            and desired.mode is ServeMode.serve
            and current is not None
            and (current.version, current.variant, current.release)
            == (desired.version, desired.variant, desired.release)
            and desired.model not in state.shadow
            and self.slots.serves(current)
        ):
            if not self._signer_current(payload, desired):
                return
            self._already_serving(desired)
            return
        try:
            self.tuf.check(desired)
            # that refresh synced the director key list: the signer must still be trusted
            check_signer(payload, self.keyring.keys, desired.seq)
            check_release_floor(
                desired, state.release_floor.get(desired.model, 0), state.previous.get(desired.model)
            )
        except RepositoryUnavailable as exc:
            delay = min(60.0, max(self.settings.reconnect_max_s, 1.0))
            log.warning("%s; retrying desired state %d in %.0f s", exc.reason, desired.seq, delay)
            timer = threading.Timer(delay, self.inbox.put, args=(payload,))
            timer.daemon = True
            timer.start()
            return
        except Rejected as exc:
            self._reject(exc, desired if exc.authentic else None)
            return
        if self.keeper.state.update is not None:
            self.cancel_update(f"superseded by desired state {desired.seq}")
        self.slots.stop_shadow(desired.model)
        store = self.keeper.store
        partial, _ = store.download_paths(
            desired.model, desired.version, desired.variant, desired.hashes["sha256"]
        )
        self.reporter.advance(accept(self.keeper.state, desired, utcnow(), store.relpath(partial)))

    def _already_serving(self, desired: DesiredState) -> None:
        """Answer a desired state for the version that serves: ``succeeded``, after applying its
        routing policy if that differs from the one in force (a policy change is a deployment too).
        The policy takes effect when the state holding it is saved (the routing table watches the
        state), which comes after the report is journaled and before it is sent."""
        state = self.keeper.state.model_copy(update={"last_desired_seq": desired.seq})
        policy = desired.routing.to_dict() if desired.routing is not None else None
        reason, details = "already serving this version", None
        if policy != state.routing.get(desired.model):
            state = set_routing(state, desired.model, policy)
            reason = "routing policy applied" if policy is not None else "routing policy removed"
            details = {"routing": desired.routing.mode.value if desired.routing is not None else None}
            log.info("%s %s: %s", desired.model, desired.version, reason)
        self.reporter.send(
            DeploymentPhase.succeeded,
            desired_seq=desired.seq,
            rollout_id=desired.rollout_id,
            model=desired.model,
            version=desired.version,
            reason=reason,
            details=details,
            # persisted with the report's seq, after its journal: a kill never loses the report
            state=state,
        )

    def cancel_update(self, reason: str) -> None:
        """End the update in flight for a newer desired state (an outcome still to report is
        reported instead)."""
        upd = self.keeper.state.update
        assert upd is not None
        if upd.phase in OUTCOMES:
            self.reporter.finish_outcome()
            return
        if upd.phase is UpdatePhase.probation and upd.mode is ServeMode.shadow:
            self.slots.stop_shadow(upd.model, persist=False)
        self.reporter.advance(cancel(self.keeper.state, utcnow(), reason))

    # ---------------------------------------------------------------- verification

    def _verify_director(self, payload: bytes, last_seq: int) -> DesiredState:
        """verify_desired, refreshing the director key list through TUF once when the signer is
        unknown (a rotated key) or trusted but not the current one (perhaps retired since)."""
        try:
            desired = verify_desired(payload, self.keyring.keys, self.device_id, last_seq, utcnow())
        except BadSignature:
            if set(envelope_keyids(payload)) & set(self.keyring.keyids):
                raise  # a known key whose signature fails: forged, a refresh changes nothing
            if not self._refresh_director_keys():
                raise
            return verify_desired(payload, self.keyring.keys, self.device_id, last_seq, utcnow())
        if self.keyring.primary not in envelope_keyids(payload) and self._refresh_director_keys():
            return verify_desired(payload, self.keyring.keys, self.device_id, last_seq, utcnow())
        return desired

    def _refresh_director_keys(self) -> bool:
        """Sync the director key list from the image repository; True if the trusted keys changed."""
        try:
            return self.tuf.sync_director_keys()
        except Rejected as exc:
            log.warning("could not refresh the director keys: %s", exc.reason)
            return False

    def _signer_current(self, payload: bytes, desired: DesiredState) -> bool:
        """For the shortcuts that install nothing (the version already served, the update already
        in flight) and so skip the TUF check whose refresh syncs the director keys: sync them here
        and re-check the signer. Otherwise a device that slept through a rotation and the
        retirement of its only key would let that stolen key raise its ``last_desired_seq``, and
        the genuine director's next DesiredStates would look stale. A repository that cannot be
        reached keeps the keys the device has (as everywhere else)."""
        self._refresh_director_keys()
        try:
            check_signer(payload, self.keyring.keys, desired.seq)
        except Rejected as exc:
            self._reject(exc, desired if exc.authentic else None)
            return False
        return True

    def _reject(self, exc: Rejected, desired: DesiredState | None = None) -> None:
        log.warning("desired state rejected: %s", exc.reason)
        self.rejected.add(exc.code)
        state = self.keeper.state
        if exc.authentic and exc.seq is not None:  # persisted with the report's seq, after its journal
            state = state.model_copy(update={"last_rejected_seq": exc.seq})
        self.reporter.send(
            DeploymentPhase.failed,
            desired_seq=exc.seq if exc.authentic else None,
            rollout_id=desired.rollout_id if desired else None,
            model=desired.model if desired else None,
            version=desired.version if desired else None,
            reason=exc.reason,
            details={"code": exc.code, "claimed_seq": exc.seq, "rejected": True},
            state=state,
        )


def _same_target(old: dict[str, Any], new: DesiredState) -> bool:
    fresh = new.to_dict()
    return all(old.get(k) == fresh.get(k) for k in _TARGET_KEYS)
