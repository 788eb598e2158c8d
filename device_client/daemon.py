"""The device daemon: the wiring of state machine, store, trust, download, runtime, health and MQTT.

Threads: paho's network thread only queues incoming desired states (and may flag that a newer,
correctly signed one arrived, to interrupt a download); ONE worker thread makes every decision and
every state transition; a health thread publishes a window every ``health_window_s``; the local
inference API serves callers on its own threads and never waits for the worker.

Start-up: load the state (``StateStore``: primary, ``.prev`` copy, or adopt installed slots), keep
the report seq monotonic (if no state file survived, start it from the wall clock in ms), apply
crash recovery (``state.recovery_action``: mid-download resumes from the ``.partial`` file, or takes
the complete file when the kill came between its rename and the commit; mid-verify/install restarts
verification from the complete download with bounded attempts and discards the half-extracted slot;
mid-probation reverts to the last known good model and reports ``rolled_back``), garbage-collect
what the state does not reference, load the serving model of each model name (plus the previous
one, warm when ``keep_previous_warm``, else cold; plus a shadow that passed its probation; a current
slot that no longer loads falls back to the previous one, which becomes current, else nothing serves
that model), start the local API, then connect MQTT. A save that fails at start-up (full disk) does
not stop the daemon: the state stays in memory and the worker saves it (and reports an outcome the
recovery left) as soon as it can.

A DesiredState goes through, persisting the state after every step and reporting every phase:

1. ``trust.verify_desired`` (signature, device id, seq, expiry). A redelivery of the accepted seq
   is ignored silently; any other rejection is reported as ``failed`` with ``"<code>: <why>"``
   and changes nothing. Forged, unsigned, replayed, misaddressed and expired messages carry no
   ``desired_seq`` (their claims are not trusted; the claimed seq is in ``details``); rejections
   of authentic messages (TUF, release floor) carry it, so the deployment fails.
2. The image repository (``trust.TufVerifier``) and the release floor. Only now may a valid newer
   desired state cancel the update in flight (reported ``cancelled``); an invalid one never does.
3. ``downloading``: a pre-flight space check (download + extraction + ``min_free_bytes`` must fit,
   else ``disk_full``), then ``fetcher.download_resumable`` into ``downloads/*.partial`` (Range
   resume, size cap, deadline, SHA-256 while streaming; ``download_rate_limit_bps`` throttles it).
   A bundle already installed in a slot (the previous version: a rollback) is not downloaded again.
4. ``verifying``: length and SHA-256 of the complete file against the desired state (which TUF
   confirmed), ``bundle.json`` must name the desired model/version/release/variant, then
   ``store.install_bundle`` extracts it safely into its slot.
5. ``installing``: ``ModelHost.load`` (signature, validation vectors, warm-up, at low CPU
   priority); a ``ModelRejected`` fails the update and the current model keeps serving.
6. ``probation`` (serve): the baseline is the outgoing model's p95 since its own swap; the swap
   is a reference flip; every ``probation_tick_s`` the worker applies ``health.evaluate_probation``
   to ``HealthRecorder.since_mark``; a breach persists ``rolled_back``, then flips back to the warm
   previous model and reports it with the numbers (a save that fails changes nothing: the revert is
   retried, never re-judged); a pass reports ``succeeded`` and raises the release floor.
   Shadow mode loads the candidate beside the serving model (``ModelHost.start_shadow``), judges the
   candidate's own errors and latency (p95 against the serving model's), never swaps, and after a
   pass keeps shadowing (persisted in ``state.shadow``) until the next desired state.

Failures at any step (network, hash, unsafe bundle, full disk, rejected model) end in ``failed``
with the reason while the current model keeps serving. A download interrupted by a stop or by a
newer desired state keeps its ``.partial`` file. An unreachable repository is retried after a
backoff. No message and no exception in a step can stop the worker: it logs and carries on; an
unexpected exception while downloading, verifying or installing fails the update
(``internal_error: ...``) rather than retrying it unreported. A rollback whose cold previous model no
longer loads serves nothing for that model (``rollback_error`` in the report's details).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import queue
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc

from .api import InferenceServer
from .config import DeviceSettings
from .enroll import Identity
from .fetcher import HttpSettings, download_resumable, url_origin
from .health import ProbationOutcome, WindowStats, evaluate_probation
from .mqtt import MQTT_STATUS_FILE, MqttEndpointConfig, MqttLink, ReportJournal
from .protocol import (
    BundleError,
    DeploymentPhase,
    DesiredState,
    Presence,
    Report,
    ServeMode,
    TopicKind,
    device_topic,
)
from .protocol.bundle import file_sha256, read_manifest
from .protocol.messages import utcnow
from .runtime import ModelHost, ModelRejected, NoModel
from .state import (
    OUTCOMES,
    DeviceState,
    RecoveryKind,
    Slot,
    UpdatePhase,
    accept,
    allocate_report_seq,
    apply_recovery,
    cancel,
    downloaded,
    fail,
    finish,
    installed,
    passed,
    recovery_action,
    revert,
    verified,
)
from .store import DiskFull, StateStore, StoreError
from .trust import (
    BadSignature,
    DirectorKeyring,
    Duplicate,
    Rejected,
    RepositoryUnavailable,
    TufVerifier,
    check_release_floor,
    check_signer,
    envelope_keyids,
    target_url,
    verify_desired,
)

log = logging.getLogger(__name__)

JOURNAL_DIR = "outbox"
#: phases whose unexpected exceptions fail the update (nothing new serves yet)
_FAILABLE = frozenset({UpdatePhase.downloading, UpdatePhase.verifying, UpdatePhase.installing})
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Interrupted(Exception):
    """A download stopped on purpose (daemon stopping, or a newer desired state arrived)."""


class _StepFailed(Exception):
    def __init__(self, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details or {}


class Daemon:
    """The device daemon; ``start()`` returns once the API serves and MQTT is connecting."""

    def __init__(self, settings: DeviceSettings, identity: Identity | None = None) -> None:
        self.settings = settings
        self.identity = identity or Identity.load(settings.data_dir)
        self.device_id = self.identity.device_id
        self.data_dir = Path(settings.data_dir).absolute()
        self.store = StateStore(self.data_dir)
        self.journal = ReportJournal(self.data_dir / JOURNAL_DIR)
        self.hosts: dict[str, ModelHost] = {}
        self.api = InferenceServer(
            self.hosts,
            host=settings.api_host,
            port=settings.api_port,
            max_body_bytes=settings.api_max_body_bytes,
            extra_health=lambda: {"rejected_messages": self.rejected_messages()},
        )
        self.http = HttpSettings(
            token=self.identity.device_token,
            # the token is for the server; bundles may come from a static server or CDN
            token_origin=url_origin(self.identity.tuf_metadata_url),
            ca_cert=settings.ca_cert,
            connect_timeout_s=settings.download_connect_timeout_s,
            read_timeout_s=settings.download_read_timeout_s,
        )
        self.keyring = DirectorKeyring(self.identity.director_file, self.identity.director_keys_file)
        self.tuf = TufVerifier(
            self.identity.tuf_dir,
            self.identity.tuf_metadata_url,
            self.identity.tuf_targets_url,
            self.http,
            max_metadata_bytes=settings.max_metadata_bytes,
            deadline_s=settings.metadata_deadline_s,
            keyring=self.keyring,
        )
        self.state = DeviceState()
        self.link: MqttLink | None = None
        self._inbox: queue.Queue[bytes] = queue.Queue()
        #: messages on the device's topics refused since start, per reason code (GET /v1/health)
        self._rejected: Counter[str] = Counter()
        self._rejected_lock = threading.Lock()
        self._stop = threading.Event()
        self._supersede = threading.Event()
        self._threads: list[threading.Thread] = []
        self._hardware: Any = None
        self._health_seq = _now_ms()
        self._started = False
        #: (reason, details) of a probation breach whose outcome is not persisted yet (retried)
        self._pending_breach: tuple[str, dict[str, Any]] | None = None
        #: that breach's host already flipped back to the previous model (only the save is retried)
        self._breach_flipped = False
        #: a retry-only step (probation revert, outcome report) failed to save: warned once
        self._save_warned = False
        #: a start-up commit failed: the state lives in memory only until the worker saves it
        self._unsaved = False
        #: slot paths that did not load at start-up (intact bundle.json, damaged model files):
        #: never reused by an install of that version, which extracts the bundle over them
        self._broken_slots: set[str] = set()
        #: details of the outcome being reported, kept while its reporting is retried
        self._outcome_details: dict[str, Any] | None = None

    # ================================================================ lifecycle

    def start(self) -> Daemon:
        from .enroll import hardware_facts

        self._hardware = hardware_facts()
        loaded = self.store.load()
        state = loaded.state
        if loaded.problems:
            log.error("state problems at start: %s", "; ".join(loaded.problems))
        floor = self.journal.max_seq()
        if loaded.source in ("fresh", "empty"):
            floor = max(floor, _now_ms())  # the server drops seq <= last seen: stay above it
        if floor > state.report_seq:
            state = state.model_copy(update={"report_seq": floor})
        upd = state.update
        bundle_present = bool(upd and upd.bundle_path and (self.data_dir / upd.bundle_path).exists())
        if upd is not None and upd.bundle_path == "":  # a reused slot stands in for the download
            bundle_present = True
        action = recovery_action(
            state, bundle_present=bundle_present, max_attempts=self.settings.max_install_attempts
        )
        if action.kind is not RecoveryKind.nothing:
            log.warning("recovering from %s: %s %s", state.phase.value, action.kind.value, action.reason)
        state = apply_recovery(state, action, utcnow())
        self._commit_at_start(state, "the recovered state")
        with contextlib.suppress(OSError):
            self.store.gc(state)
        self._load_models()
        self.api.start()
        self._start_mqtt()
        if self.state.update is not None and self.state.update.phase in OUTCOMES:
            try:
                self._finish_outcome({"recovered": action.kind.value} if action.reason else None)
            except (OSError, StoreError) as exc:  # the worker reports it once the state can be saved
                log.error("cannot report the %s outcome yet: %s", self.state.phase.value, exc)
        self._started = True
        for name, target in (("fleet-worker", self._run), ("fleet-health", self._health_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("device %s started; serving %s", self.device_id, self.state.serving())
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self._threads.clear()
        if self.link is not None:
            self.link.stop(final=(self._topic(TopicKind.presence), self._presence("offline")))
        self.api.stop()
        for host in list(self.hosts.values()):
            host.close()
        log.info("device %s stopped", self.device_id)

    def _start_mqtt(self) -> None:
        ident = self.identity
        config = MqttEndpointConfig(
            host=ident.mqtt_host,
            port=ident.mqtt_port,
            ca_file=self.settings.ca_cert or ident.ca_file,
            cert_file=self.settings.client_cert or ident.cert_file,
            key_file=self.settings.client_key or ident.key_file,
            client_id=self.device_id,
            reconnect_min_s=self.settings.reconnect_min_s,
            reconnect_max_s=self.settings.reconnect_max_s,
        )
        self.link = MqttLink(
            config,
            self.journal,
            will=(self._topic(TopicKind.presence), self._presence("offline")),
            on_connected=lambda link: link.publish(
                self._topic(TopicKind.presence), self._presence("online"), qos=1, retain=True
            ),
            status_file=self.data_dir / MQTT_STATUS_FILE,
        )
        self.api.mqtt = self.link  # GET /v1/health shows its state and last error
        self.link.subscribe(self._topic(TopicKind.desired), self._on_desired, qos=1)
        self.link.start()

    def _topic(self, kind: TopicKind) -> str:
        return device_topic(self.device_id, kind)

    def _presence(self, status: str) -> bytes:
        return Presence.build(
            device_id=self.device_id,
            status=status,
            at=utcnow(),
            hardware=self._hardware,
            serving=self.state.serving(),
        ).to_json()

    # ================================================================ models

    def _new_host(self, model: str) -> ModelHost:
        return ModelHost.from_settings(model, self.settings)

    def _load_models(self) -> None:
        state = self.state
        for model, slot in state.current.items():
            host = self._new_host(model)
            prev = state.previous.get(model)
            try:
                host.install(self.store.slot_dir(slot))
            except Exception as exc:  # a damaged slot must not keep the daemon from starting
                log.error("cannot load serving model %s %s: %s", model, slot.version, exc)
                self._broken_slots.add(slot.path)
                if prev is None or prev.path == slot.path or not self._fall_back(host, model, prev):
                    log.error("no %s model serves", model)
                    continue
                prev = None  # it serves now
            self.hosts[model] = host
            if prev is not None and prev.path != slot.path:
                self._set_previous(host, prev)
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
            self._broken_slots.add(prev.path)
            return False
        log.warning("serving the previous model %s %s instead", model, prev.version)
        current = {**self.state.current, model: prev}
        previous = {k: v for k, v in self.state.previous.items() if k != model}
        state = self.state.model_copy(update={"current": current, "previous": previous})
        self._commit_at_start(state, f"the fallback to {model} {prev.version}")
        return True

    def _set_previous(self, host: ModelHost, slot: Slot | None) -> None:
        """Warm or cold previous model per ``keep_previous_warm`` (see runtime's docstring)."""
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

    # ================================================================ persistence and reports

    def _commit(self, state: DeviceState) -> None:
        self.store.save(state)
        self.state = state
        self._unsaved = False

    def _commit_at_start(self, state: DeviceState, what: str) -> None:
        """Commit at start-up, where a failed save (full disk) must not keep the daemon from
        serving: keep ``state`` in memory and let the worker retry the save (``_save_unsaved``)."""
        try:
            self._commit(state)
        except (OSError, StoreError) as exc:
            log.error("cannot persist %s at start-up (retrying in the background): %s", what, exc)
            self.state = state
            self._unsaved = True

    def _save_unsaved(self) -> None:
        """Retry a save that failed where nothing else retries it (at start-up, or the report seq
        of a report journaled before its commit failed); quietly: the failure was logged."""
        try:
            self._commit(self.state)
        except (OSError, StoreError) as exc:
            log.debug("state still not saved: %s", exc)
            return
        log.info("the state is saved again")

    def _send_report(
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
        topic = self._topic(TopicKind.report)
        fields = (desired_seq, rollout_id, model, version, reason, details)
        if seq is not None:  # an outcome: its seq is persisted already
            self.link.publish_report(seq, topic, self._build_report(phase, seq, *fields, self.state))
            return seq
        state, seq = allocate_report_seq(self.state if state is None else state)
        self.journal.append(seq, topic, self._build_report(phase, seq, *fields, state))
        try:
            self._commit(state)
        except BaseException:
            # the journaled report goes out (it may be in flight already): never reuse its seq
            self.state = self.state.model_copy(update={"report_seq": max(self.state.report_seq, seq)})
            self._unsaved = True
            raise
        self.link.flush()
        return seq

    def _build_report(
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

    def _report_update(self, details: dict[str, Any] | None = None, *, seq: int | None = None) -> None:
        upd = self.state.update
        assert upd is not None
        self._send_report(
            DeploymentPhase(upd.phase.value),
            desired_seq=upd.desired_seq,
            rollout_id=upd.desired.get("rollout_id"),
            model=upd.model,
            version=upd.version,
            reason=upd.reason,
            details=details,
            seq=seq,
        )

    def _advance(self, state: DeviceState, details: dict[str, Any] | None = None) -> None:
        """Persist ``state``, then report its phase (an outcome is reported and cleared)."""
        self._commit(state)
        upd = state.update
        assert upd is not None
        if upd.phase in OUTCOMES:
            self._finish_outcome(details)
        else:
            self._report_update(details)

    def _finish_outcome(self, details: dict[str, Any] | None = None) -> None:
        """Report the outcome (under the seq it keeps across retries and restarts) and clear it.
        A save that fails leaves the outcome in place; the worker retries with the same details."""
        upd = self.state.update
        assert upd is not None
        assert upd.phase in OUTCOMES
        if details is None:
            details = self._outcome_details
        self._outcome_details = details
        seq = upd.outcome_report_seq
        if seq is None:
            state, seq = allocate_report_seq(self.state)
            state = state.model_copy(
                update={"update": state.update.model_copy(update={"outcome_report_seq": seq})}  # type: ignore[union-attr]
            )
            self._commit(state)
        self._report_update(details, seq=seq)
        self._commit(finish(self.state))
        self._outcome_details = None
        try:
            self.store.gc(self.state)
        except OSError as exc:
            log.warning("garbage collection failed: %s", exc)

    # ================================================================ incoming desired states

    @property
    def director_keys(self) -> list[Any]:
        """The director public keys trusted now (see :class:`~device_client.trust.DirectorKeyring`)."""
        return self.keyring.keys

    def _verify_director(self, payload: bytes, last_seq: int) -> DesiredState:
        """verify_desired, refreshing the director key list through TUF once when the signer is
        unknown (a rotated key) or trusted but not the current one (perhaps retired since)."""
        try:
            desired = verify_desired(payload, self.director_keys, self.device_id, last_seq, utcnow())
        except BadSignature:
            if set(envelope_keyids(payload)) & set(self.keyring.keyids):
                raise  # a known key whose signature fails: forged, a refresh changes nothing
            if not self._refresh_director_keys():
                raise
            return verify_desired(payload, self.director_keys, self.device_id, last_seq, utcnow())
        if self.keyring.primary not in envelope_keyids(payload) and self._refresh_director_keys():
            return verify_desired(payload, self.director_keys, self.device_id, last_seq, utcnow())
        return desired

    def _refresh_director_keys(self) -> bool:
        """Sync the director key list from the image repository; True if the trusted keys changed."""
        try:
            return self.tuf.sync_director_keys()
        except Rejected as exc:
            log.warning("could not refresh the director keys: %s", exc.reason)
            return False

    def _on_desired(self, topic: str, payload: bytes) -> None:
        """paho thread: queue it; flag a download to stop if this is a genuine newer state.

        Newer than the last *accepted* seq, not the update's own: after a same-target re-issue the
        two differ, and the retained re-issue redelivered on every reconnect must not restart the
        download's connection. Nor must a retained desired state the device already rejected
        (``last_rejected_seq``): the worker ignores it, so it supersedes nothing."""
        self._inbox.put(payload)
        state = self.state
        upd = state.update
        if upd is not None and upd.phase is UpdatePhase.downloading:
            with contextlib.suppress(Rejected):
                desired = verify_desired(
                    payload, self.director_keys, self.device_id, state.last_desired_seq, utcnow()
                )
                if desired.seq != state.last_rejected_seq:
                    self._supersede.set()

    def _handle_desired(self, payload: bytes) -> None:
        state = self.state
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
        if upd is not None and self._same_target(upd.desired, desired):
            if not self._signer_current(payload, desired):
                return
            log.info("desired state %d re-issues the update in flight; continuing", desired.seq)
            self._commit(state.model_copy(update={"last_desired_seq": desired.seq}))
            return
        current = state.current.get(desired.model)
        if (
            upd is None
            and desired.mode is ServeMode.serve
            and current is not None
            and (current.version, current.variant, current.release)
            == (desired.version, desired.variant, desired.release)
            and desired.model not in state.shadow
            and self._serves(current)
        ):
            if not self._signer_current(payload, desired):
                return
            self._send_report(
                DeploymentPhase.succeeded,
                desired_seq=desired.seq,
                rollout_id=desired.rollout_id,
                model=desired.model,
                version=desired.version,
                reason="already serving this version",
                # persisted with the report's seq, after its journal: a kill never loses the report
                state=self.state.model_copy(update={"last_desired_seq": desired.seq}),
            )
            return
        try:
            self.tuf.check(desired)
            # that refresh synced the director key list: the signer must still be trusted
            check_signer(payload, self.director_keys, desired.seq)
            check_release_floor(
                desired, state.release_floor.get(desired.model, 0), state.previous.get(desired.model)
            )
        except RepositoryUnavailable as exc:
            delay = min(60.0, max(self.settings.reconnect_max_s, 1.0))
            log.warning("%s; retrying desired state %d in %.0f s", exc.reason, desired.seq, delay)
            timer = threading.Timer(delay, self._inbox.put, args=(payload,))
            timer.daemon = True
            timer.start()
            return
        except Rejected as exc:
            self._reject(exc, desired if exc.authentic else None)
            return
        if self.state.update is not None:
            self._cancel_update(f"superseded by desired state {desired.seq}")
        self._stop_shadow(desired.model)
        partial, _ = self.store.download_paths(
            desired.model, desired.version, desired.variant, desired.hashes["sha256"]
        )
        self._advance(accept(self.state, desired, utcnow(), self.store.relpath(partial)))

    def _serves(self, slot: Slot) -> bool:
        """Whether ``slot`` really serves now (not only named current: a current slot that did not
        load at start-up with no previous to fall back to serves nothing; installing it again then
        reports the truth)."""
        host = self.hosts.get(slot.model)
        serving = host.serving if host is not None else None
        return serving is not None and serving.path == self.store.slot_dir(slot)

    def _signer_current(self, payload: bytes, desired: DesiredState) -> bool:
        """For the shortcuts that install nothing (the version already served, the update already
        in flight) and so skip the TUF check whose refresh syncs the director keys: sync them here
        and re-check the signer. Otherwise a device that slept through a rotation and the
        retirement of its only key would let that stolen key raise its ``last_desired_seq``, and
        the genuine director's next DesiredStates would look stale. A repository that cannot be
        reached keeps the keys the device has (as everywhere else)."""
        self._refresh_director_keys()
        try:
            check_signer(payload, self.director_keys, desired.seq)
        except Rejected as exc:
            self._reject(exc, desired if exc.authentic else None)
            return False
        return True

    @staticmethod
    def _same_target(old: dict[str, Any], new: DesiredState) -> bool:
        keys = ("model", "version", "release", "variant", "target", "length", "hashes", "mode")
        fresh = new.to_dict()
        return all(old.get(k) == fresh.get(k) for k in keys) and old.get("probation") == fresh.get(
            "probation"
        )

    def rejected_messages(self) -> dict[str, int]:
        """Messages on this device's MQTT topics refused since the daemon started, per reason code
        (``malformed``, ``unsigned``, ``bad_signature``, ``wrong_device``, ``replayed``, ...)."""
        with self._rejected_lock:
            return dict(sorted(self._rejected.items()))

    def _reject(self, exc: Rejected, desired: DesiredState | None = None) -> None:
        log.warning("desired state rejected: %s", exc.reason)
        with self._rejected_lock:
            self._rejected[exc.code] += 1
        state = self.state
        if exc.authentic and exc.seq is not None:  # persisted with the report's seq, after its journal
            state = state.model_copy(update={"last_rejected_seq": exc.seq})
        self._send_report(
            DeploymentPhase.failed,
            desired_seq=exc.seq if exc.authentic else None,
            rollout_id=desired.rollout_id if desired else None,
            model=desired.model if desired else None,
            version=desired.version if desired else None,
            reason=exc.reason,
            details={"code": exc.code, "claimed_seq": exc.seq, "rejected": True},
            state=state,
        )

    def _cancel_update(self, reason: str) -> None:
        upd = self.state.update
        assert upd is not None
        if upd.phase in OUTCOMES:
            self._finish_outcome()
            return
        if upd.phase is UpdatePhase.probation and upd.mode is ServeMode.shadow:
            self._stop_shadow(upd.model, persist=False)
        self._advance(cancel(self.state, utcnow(), reason))

    def _stop_shadow(self, model: str, *, persist: bool = True) -> None:
        host = self.hosts.get(model)
        if host is not None and host.shadow_candidate is not None:
            host.stop_shadow()
        if persist and model in self.state.shadow:
            shadow = dict(self.state.shadow)
            shadow.pop(model)
            self._commit(self.state.model_copy(update={"shadow": shadow}))

    # ================================================================ the worker

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._unsaved:
                    self._save_unsaved()
                payload = self._next_message()
                if payload is not None:
                    self._handle_desired(payload)
                elif self.state.update is not None:
                    self._step()
            except Exception:
                log.exception("update step failed; the current model keeps serving")
                self._stop.wait(1.0)

    def _next_message(self) -> bytes | None:
        """The next queued desired state, or None to take a step of the update in flight.

        None while ``installing``: an install cannot be cancelled (no such transition), so a newer
        desired state stays queued until the update reaches probation, where it supersedes it."""
        upd = self.state.update
        if upd is not None and upd.phase is UpdatePhase.installing:
            return None
        if self._pending_breach is not None:  # a breach is being reverted: nothing may cancel it
            self._stop.wait(self.settings.probation_tick_s)
            return None
        if upd is None:
            wait = 0.5
        elif upd.phase is UpdatePhase.probation:
            wait = self.settings.probation_tick_s
        else:
            wait = 0.0
        try:
            if wait <= 0:
                return self._inbox.get_nowait()
            return self._inbox.get(timeout=wait)
        except queue.Empty:
            return None

    def _step(self) -> None:
        upd = self.state.update
        assert upd is not None
        try:
            if upd.phase is UpdatePhase.downloading:
                self._download()
            elif upd.phase is UpdatePhase.verifying:
                self._verify()
            elif upd.phase is UpdatePhase.installing:
                self._install()
            elif upd.phase is UpdatePhase.probation:
                self._probation_tick()
            elif upd.phase in OUTCOMES:
                self._finish_outcome()
            if self._save_warned and not self._unsaved and self._pending_breach is None:
                self._save_warned = False
                log.info("the state is saved again")
        except _StepFailed as exc:
            self._fail_update(exc.reason, exc.details)
        except Exception as exc:
            # In probation or with an outcome to report there is nothing to fail (a serve-mode
            # probation can only be reverted): the state did not change, the worker retries the
            # step after a pause (a full disk: until space is free).
            if self.state.phase not in _FAILABLE:
                if not isinstance(exc, (StoreError, OSError)):
                    raise
                # a save (or the report journal's write) that fails: retried every tick, so
                # warned once (not a traceback a second), then quietly until it succeeds
                if self._save_warned:
                    log.debug("%s %s: still cannot save: %s", upd.phase.value, upd.version, exc)
                else:
                    log.warning(
                        "%s %s: cannot save the state (retrying until it can): %s",
                        upd.phase.value,
                        upd.version,
                        exc,
                    )
                    self._save_warned = True
                self._stop.wait(1.0)
                return
            if isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in _DISK_FULL):
                self._fail_update(f"disk_full: {exc}")
                return
            # anything else (EIO/EROFS from the disk, a bug) before the candidate serves: retrying
            # every second would wedge the update unreported; fail it, the current model serves on
            log.exception("unexpected error while %s %s", self.state.phase.value, upd.version)
            self._fail_update(f"internal_error: {exc.__class__.__name__}: {exc}")

    def _fail_update(self, reason: str, details: dict[str, Any] | None = None) -> None:
        """Fail the update in flight. On a full disk, first give back the space the update took (its
        partial or complete download): persisting the failure and journaling its report need a few
        kilobytes, and the download is garbage once the update has failed anyway."""
        upd = self.state.update
        if upd is not None and reason.startswith("disk_full"):
            for rel in (upd.partial_path, upd.bundle_path):
                if rel:  # "" stands for a reused slot, which is not ours to delete
                    with contextlib.suppress(OSError):
                        (self.data_dir / rel).unlink(missing_ok=True)
        self._advance(fail(self.state, utcnow(), reason), details)

    def _desired(self) -> DesiredState:
        assert self.state.update is not None
        return DesiredState.model_validate(self.state.update.desired)

    def _installed_slot(self, d: DesiredState) -> Slot | None:
        """An intact slot already holding exactly this bundle (e.g. the previous version); not one
        that failed to load at start-up (its bundle.json may be intact, its model files are not)."""
        for slot in (self.state.previous.get(d.model), self.state.current.get(d.model)):
            if (
                slot is not None
                and slot.path not in self._broken_slots
                and (slot.version, slot.release, slot.variant) == (d.version, d.release, d.variant)
                and (self.store.slot_dir(slot) / "bundle.json").exists()
            ):
                return slot
        return None

    # ---------------------------------------------------------------- downloading

    def _download(self) -> None:
        upd = self.state.update
        assert upd is not None
        assert upd.partial_path is not None
        d = self._desired()
        if self._installed_slot(d) is not None:
            self._advance(downloaded(self.state, utcnow(), ""), {"reused_slot": True})
            return
        partial = self.data_dir / upd.partial_path
        _, final = self.store.download_paths(d.model, d.version, d.variant, d.hashes["sha256"])
        if self._complete_download(final, d):
            log.info("the download of %s completed before a restart; not downloading it again", d.target)
            self._advance(
                downloaded(self.state, utcnow(), self.store.relpath(final)),
                {"download": {"complete_before_restart": True}},
            )
            return
        have = partial.stat().st_size if partial.exists() else 0
        need = (d.length - have) + d.length + self.settings.min_free_bytes
        free = shutil.disk_usage(self.store.downloads_dir).free
        if free < need:
            raise _StepFailed(
                f"disk_full: {d.length} bytes to download and extract plus a reserve of "
                f"{self.settings.min_free_bytes} need {need} bytes free, {free} available",
                {"free_bytes": free, "needed_bytes": need},
            )
        url = target_url(self.identity.tuf_targets_url, d.target, d.hashes["sha256"])
        seen: dict[str, Any] = {"resumed_from": have}

        def on_response(status: int, headers: Mapping[str, str]) -> None:
            seen["http_status"] = status
            seen["content_range"] = headers.get("content-range")

        rate = self.settings.download_rate_limit_bps
        started = time.monotonic()
        first: list[int] = []

        def on_progress(received: int, total: int) -> None:
            if self._stop.is_set() or self._supersede.is_set():
                raise _Interrupted("interrupted")
            if rate:
                if not first:
                    first.append(received)
                due = started + (received - have) / rate
                delay = due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    raise _Interrupted("stopping")

        self._supersede.clear()
        if have:
            log.info("resuming download of %s at byte %d of %d (Range request)", d.target, have, d.length)
        read_bytes = self.settings.download_chunk_bytes
        if rate:  # reads of ~0.1 s of the budget keep the limiter smooth
            read_bytes = max(min(read_bytes, rate // 10), 1024)
        try:
            download_resumable(
                url,
                partial,
                expected_length=d.length,
                expected_sha256=d.hashes["sha256"],
                max_bytes=self.settings.max_bundle_bytes,
                deadline_s=self.settings.download_deadline_s,
                http=self.http,
                attempts=self.settings.download_attempts,
                final_path=final,
                on_progress=on_progress,
                on_response=on_response,
                read_bytes=read_bytes,
            )
        except _Interrupted:
            log.info("download of %s interrupted at %d bytes", d.target, _size(partial))
            return
        except tuf_exc.DownloadError as exc:
            raise _StepFailed(f"download_failed: {exc}", seen) from None
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise _StepFailed(f"disk_full: while downloading: {exc}", seen) from None
            raise _StepFailed(f"download_failed: {exc}", seen) from None
        log.info("downloaded %s (%s)", d.target, seen)
        self._advance(downloaded(self.state, utcnow(), self.store.relpath(final)), {"download": seen})

    @staticmethod
    def _complete_download(final: Path, d: DesiredState) -> bool:
        """Whether ``final`` already holds the desired bundle: the download renamed it there, then
        the daemon died before it committed ``downloaded``. Anything else there is deleted."""
        if not final.exists():
            return False
        if final.stat().st_size == d.length and file_sha256(final) == (d.length, d.hashes["sha256"]):
            return True
        final.unlink(missing_ok=True)
        return False

    # ---------------------------------------------------------------- verifying

    def _verify(self) -> None:
        upd = self.state.update
        assert upd is not None
        d = self._desired()
        if not upd.bundle_path:
            slot = self._installed_slot(d)
            if slot is None:
                raise _StepFailed("bad_bundle: the installed slot to reuse is gone")
            self._advance(verified(self.state, utcnow(), slot), {"reused_slot": slot.path})
            return
        bundle = self.data_dir / upd.bundle_path
        if not bundle.exists():
            raise _StepFailed("bad_bundle: the downloaded bundle is gone")
        length, sha256 = file_sha256(bundle)
        if (length, sha256) != (d.length, d.hashes["sha256"]):
            bundle.unlink(missing_ok=True)
            raise _StepFailed(
                f"bad_bundle: {length} bytes with sha256 {sha256} differ from the desired state"
            )
        try:
            with tarfile.open(bundle, mode="r:") as tar:
                manifest = read_manifest(tar)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _StepFailed(f"bad_bundle: not a readable tar file: {exc}") from None
        except BundleError as exc:
            raise _StepFailed(f"bad_bundle: {exc}") from None
        claimed = (manifest.name, manifest.version, manifest.release, manifest.variant)
        if claimed != (d.model, d.version, d.release, d.variant):
            raise _StepFailed(f"bad_bundle: bundle.json names {claimed}, the desired state {d.target!r}")
        rel = self.store.slot_relpath(d.model, d.version, d.variant)
        try:
            slot = self.store.install_bundle(bundle, replace=rel in self._broken_slots)
        except BundleError as exc:
            raise _StepFailed(f"bad_bundle: {exc}") from None
        self._broken_slots.discard(slot.path)  # extracted afresh: whole again
        self._advance(verified(self.state, utcnow(), slot))

    # ---------------------------------------------------------------- installing

    def _install(self) -> None:
        upd = self.state.update
        assert upd is not None
        assert upd.candidate is not None
        slot_dir = self.store.slot_dir(upd.candidate)
        host = self.hosts.get(upd.model) or self._new_host(upd.model)
        warm = host.previous
        try:
            # a rollback to the warm previous model needs no load at all
            candidate = warm if warm is not None and warm.path == slot_dir else host.load(slot_dir)
        except ModelRejected as exc:
            raise _StepFailed(f"model_rejected: {exc.reason}") from None
        serving = host.serving
        baseline = host.health.since_mark().p95_ms if serving is not None else None
        details = {"load_ms": round(candidate.load_ms, 3), "baseline_p95_ms": baseline}
        if upd.mode is ServeMode.shadow:
            if serving is None:
                raise _StepFailed(f"shadow mode needs a serving {upd.model} model")
            host.start_shadow(candidate)
        else:
            host.swap(candidate)
            self.hosts.setdefault(upd.model, host)
        try:
            self._advance(installed(self.state, utcnow(), baseline), details)
        except BaseException:
            if self.state.phase is UpdatePhase.installing:  # not persisted: undo the swap
                self._undo_install(host, upd.model, upd.mode)
            raise

    def _undo_install(self, host: ModelHost, model: str, mode: ServeMode) -> None:
        """The candidate serves (or shadows) but ``installed`` could not be persisted: the update
        is about to fail, so what the state names as current serves again."""
        if mode is ServeMode.shadow:
            host.stop_shadow()
            return
        self._rollback_host(host, model)
        if model in self.hosts:
            self._set_previous(self.hosts[model], self.state.previous.get(model))

    # ---------------------------------------------------------------- probation

    def _probation_tick(self) -> None:
        upd = self.state.update
        assert upd is not None
        assert upd.probation_started_at is not None
        d = self._desired()
        host = self.hosts.get(upd.model)
        now = utcnow()
        elapsed = (now - upd.probation_started_at).total_seconds()
        if self._pending_breach is not None:  # a breach whose outcome could not be saved yet
            self._revert_breach(host)  # (its flip may have dropped the host: a first install)
            return
        if host is None:  # cannot happen unless the model vanished; nothing serves it
            self._advance(revert(self.state, now, "probation: the model host is gone"))
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
            self._advance(passed(self.state, now), details)
            return
        self._pending_breach = (f"probation_failed: {verdict.reason}", details)
        self._revert_breach(host)

    def _revert_breach(self, host: ModelHost | None) -> None:
        """End a probation that breached (``_pending_breach``).

        Serve mode flips the host back to the previous model FIRST, then commits ``rolled_back``
        (current = the last known good model): the breaching candidate stops answering callers at
        once, even when the save fails (full disk). A crash between the flip and the commit is
        recovered as a crash during probation, i.e. reverted as well. A save that fails leaves
        ``_breach_flipped`` set, and the next tick retries only the save (never the flip: a second
        rollback would find no previous model and drop the host), never re-evaluating the verdict
        (the health window would measure the good model). Shadow mode commits ``failed`` before it
        stops the shadow (the shadow candidate answers no caller)."""
        upd = self.state.update
        assert upd is not None
        assert self._pending_breach is not None
        reason, details = self._pending_breach
        now = utcnow()
        if upd.mode is ServeMode.shadow:
            state = fail(self.state, now, reason)
            self._commit(state)
            self._pending_breach = None
            if host is not None:
                host.stop_shadow()
            self._finish_outcome(details)
            return
        if not self._breach_flipped:
            if host is not None:
                problem = self._rollback_host(host, upd.model)
                if problem:
                    details["rollback_error"] = problem
            self._breach_flipped = True
        state = revert(self.state, now, reason)
        self._commit(state)
        self._pending_breach = None
        self._breach_flipped = False
        if upd.model in self.hosts:
            self._set_previous(self.hosts[upd.model], state.previous.get(upd.model))
        self._finish_outcome(details)

    def _rollback_host(self, host: ModelHost, model: str) -> str | None:
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

    def _shadow_tick(
        self, host: ModelHost, stats: WindowStats, d: DesiredState, elapsed: float, now: datetime
    ) -> None:
        upd = self.state.update
        assert upd is not None
        candidate = WindowStats(
            window_s=stats.window_s,
            requests=stats.shadow_requests,
            errors=stats.shadow_errors,
            p50_ms=None,
            p95_ms=stats.shadow_p95_ms,
            p99_ms=None,
        )
        verdict = evaluate_probation(candidate, d.probation, upd.baseline_p95_ms, elapsed)
        if verdict.outcome is ProbationOutcome.continue_:
            return
        numbers = dict(verdict.numbers)
        numbers.update(agreement=stats.agreement, shadow_dropped=stats.shadow_dropped)
        details = {"probation": numbers, "reasons": list(verdict.reasons)}
        if verdict.outcome is ProbationOutcome.passed:
            state = passed(self.state, now)
            assert upd.candidate is not None
            state = state.model_copy(update={"shadow": {**state.shadow, upd.model: upd.candidate}})
            self._advance(state, details)
            return
        self._pending_breach = (f"shadow_failed: {verdict.reason}", details)
        self._revert_breach(host)

    # ================================================================ health windows

    def _health_loop(self) -> None:
        while not self._stop.wait(self.settings.health_window_s):
            try:
                self.publish_health()
            except Exception:
                log.exception("health window failed")

    def _next_health_seq(self) -> int:
        self._health_seq = max(self._health_seq + 1, _now_ms())
        return self._health_seq

    def publish_health(self) -> None:
        """One window per hosted model (and one more per running shadow candidate)."""
        link = self.link
        topic = self._topic(TopicKind.health)
        for name, host in list(self.hosts.items()):
            serving = host.serving
            closed = host.health.drain_closed()  # the parts of this window served by replaced models
            stats = host.health.snapshot_and_reset()
            if link is None:
                continue
            at = utcnow()
            for version, segment in closed:
                part = segment.to_health_window(
                    device_id=self.device_id,
                    seq=self._next_health_seq(),
                    at=at,
                    model=name,
                    version=version,
                    mode=ServeMode.serve,
                )
                link.publish(topic, part.to_json(), qos=0)
            if serving is None:
                continue
            window = stats.to_health_window(
                device_id=self.device_id,
                seq=self._next_health_seq(),
                at=at,
                model=name,
                version=serving.version,
                mode=ServeMode.serve,
            )
            link.publish(topic, window.to_json(), qos=0)
            candidate = host.shadow_candidate
            if candidate is not None:
                shadow = WindowStats(
                    window_s=stats.window_s,
                    requests=stats.shadow_requests,
                    errors=stats.shadow_errors,
                    p50_ms=None,
                    p95_ms=stats.shadow_p95_ms,
                    p99_ms=None,
                    shadow_requests=stats.shadow_requests,
                    shadow_agreed=stats.shadow_agreed,
                    shadow_errors=stats.shadow_errors,
                    shadow_p95_ms=stats.shadow_p95_ms,
                )
                sw = shadow.to_health_window(
                    device_id=self.device_id,
                    seq=self._next_health_seq(),
                    at=at,
                    model=name,
                    version=candidate.version,
                    mode=ServeMode.shadow,
                )
                link.publish(topic, sw.to_json(), qos=0)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ==================================================================== entry point


def run(settings: DeviceSettings) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = Daemon(settings).start()
    try:
        while not done.wait(1.0):
            pass
    finally:
        daemon.stop()


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m device_client.daemon")
    parser.add_argument("--data-dir", type=Path, help="the enrolled data directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    settings = DeviceSettings(data_dir=args.data_dir) if args.data_dir else DeviceSettings()
    run(settings)


if __name__ == "__main__":  # pragma: no cover
    main()
