"""The update steps before probation (:class:`Updater`): download (with its disk-space check and
rate limit), verify, install, and undo an install that could not be persisted; a step that fails
ends the update in ``failed`` while the current model keeps serving."""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import tarfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc

from ..config import DeviceSettings
from ..fetcher import HttpSettings, download_resumable
from ..protocol import BundleError, DesiredState, ServeMode
from ..protocol.bundle import file_sha256, read_manifest
from ..protocol.messages import utcnow
from ..runtime import ModelHost, ModelRejected
from ..state import UpdatePhase, downloaded, fail, installed, verified
from ..trust import target_url
from .models import Slots
from .persistence import StateKeeper
from .reporting import Reporter

log = logging.getLogger(__name__)

#: errnos of a full disk (or quota): the update fails as ``disk_full``
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class _Interrupted(Exception):
    """A download stopped on purpose (daemon stopping, or a newer desired state arrived)."""


class StepFailed(Exception):
    """A step failed for a reason the report names; the update ends in ``failed``."""

    def __init__(self, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details or {}


class Updater:
    """Downloading, verifying and installing the update in flight, persisting every step.

    3. ``downloading``: a pre-flight space check (download + extraction + ``min_free_bytes`` must
       fit, else ``disk_full``), then ``download_resumable`` into ``downloads/*.partial`` (Range
       resume, size cap, deadline, SHA-256 while streaming; ``download_rate_limit_bps`` throttles
       it). A bundle already installed in a slot (the previous version: a rollback) is not
       downloaded again. A download interrupted by a stop or by a newer desired state
       (``supersede``) keeps its ``.partial`` file.
    4. ``verifying``: length and SHA-256 of the complete file against the desired state (which TUF
       confirmed), ``bundle.json`` must name the desired model/version/release/variant, then
       ``store.install_bundle`` extracts it safely into its slot.
    5. ``installing``: ``ModelHost.load`` (signature, validation vectors, warm-up, at low CPU
       priority); a ``ModelRejected`` fails the update and the current model keeps serving. The
       baseline for probation is the outgoing model's p95 since its own swap; the swap is a
       reference flip (shadow mode starts the candidate beside the serving model instead)."""

    def __init__(
        self,
        *,
        settings: DeviceSettings,
        targets_url: str,
        http: HttpSettings,
        keeper: StateKeeper,
        reporter: Reporter,
        slots: Slots,
        stop: threading.Event,
        supersede: threading.Event,
    ) -> None:
        self.settings = settings
        self.targets_url = targets_url
        self.http = http
        self.keeper = keeper
        self.store = keeper.store
        self.reporter = reporter
        self.slots = slots
        self.stop = stop
        self.supersede = supersede

    @property
    def data_dir(self) -> Path:
        return self.store.data_dir

    # ---------------------------------------------------------------- downloading

    def download(self) -> None:
        keeper = self.keeper
        upd = keeper.state.update
        assert upd is not None
        assert upd.partial_path is not None
        d = keeper.desired()
        if self.slots.installed_slot(d) is not None:
            self.reporter.advance(downloaded(keeper.state, utcnow(), ""), {"reused_slot": True})
            return
        partial = self.data_dir / upd.partial_path
        _, final = self.store.download_paths(d.model, d.version, d.variant, d.hashes["sha256"])
        if _complete_download(final, d):
            log.info("the download of %s completed before a restart; not downloading it again", d.target)
            self.reporter.advance(
                downloaded(keeper.state, utcnow(), self.store.relpath(final)),
                {"download": {"complete_before_restart": True}},
            )
            return
        have = partial.stat().st_size if partial.exists() else 0
        need = (d.length - have) + d.length + self.settings.min_free_bytes
        free = shutil.disk_usage(self.store.downloads_dir).free
        if free < need:
            raise StepFailed(
                f"disk_full: {d.length} bytes to download and extract plus a reserve of "
                f"{self.settings.min_free_bytes} need {need} bytes free, {free} available",
                {"free_bytes": free, "needed_bytes": need},
            )
        url = target_url(self.targets_url, d.target, d.hashes["sha256"])
        seen: dict[str, Any] = {"resumed_from": have}

        def on_response(status: int, headers: Mapping[str, str]) -> None:
            seen["http_status"] = status
            seen["content_range"] = headers.get("content-range")

        rate = self.settings.download_rate_limit_bps
        started = time.monotonic()

        def on_progress(received: int, total: int) -> None:
            if self.stop.is_set() or self.supersede.is_set():
                raise _Interrupted("interrupted")
            if rate:
                due = started + (received - have) / rate
                delay = due - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    raise _Interrupted("stopping")

        self.supersede.clear()
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
            raise StepFailed(f"download_failed: {exc}", seen) from None
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise StepFailed(f"disk_full: while downloading: {exc}", seen) from None
            raise StepFailed(f"download_failed: {exc}", seen) from None
        log.info("downloaded %s (%s)", d.target, seen)
        self.reporter.advance(
            downloaded(keeper.state, utcnow(), self.store.relpath(final)), {"download": seen}
        )

    # ---------------------------------------------------------------- verifying

    def verify(self) -> None:
        keeper = self.keeper
        upd = keeper.state.update
        assert upd is not None
        d = keeper.desired()
        if not upd.bundle_path:
            slot = self.slots.installed_slot(d)
            if slot is None:
                raise StepFailed("bad_bundle: the installed slot to reuse is gone")
            self.reporter.advance(verified(keeper.state, utcnow(), slot), {"reused_slot": slot.path})
            return
        bundle = self.data_dir / upd.bundle_path
        if not bundle.exists():
            raise StepFailed("bad_bundle: the downloaded bundle is gone")
        length, sha256 = file_sha256(bundle)
        if (length, sha256) != (d.length, d.hashes["sha256"]):
            bundle.unlink(missing_ok=True)
            raise StepFailed(f"bad_bundle: {length} bytes with sha256 {sha256} differ from the desired state")
        try:
            with tarfile.open(bundle, mode="r:") as tar:
                manifest = read_manifest(tar)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise StepFailed(f"bad_bundle: not a readable tar file: {exc}") from None
        except BundleError as exc:
            raise StepFailed(f"bad_bundle: {exc}") from None
        claimed = (manifest.name, manifest.version, manifest.release, manifest.variant)
        if claimed != (d.model, d.version, d.release, d.variant):
            raise StepFailed(f"bad_bundle: bundle.json names {claimed}, the desired state {d.target!r}")
        rel = self.store.slot_relpath(d.model, d.version, d.variant)
        try:
            slot = self.store.install_bundle(bundle, replace=rel in self.slots.broken)
        except BundleError as exc:
            raise StepFailed(f"bad_bundle: {exc}") from None
        self.slots.broken.discard(slot.path)  # extracted afresh: whole again
        self.reporter.advance(verified(keeper.state, utcnow(), slot))

    # ---------------------------------------------------------------- installing

    def install(self) -> None:
        upd = self.keeper.state.update
        assert upd is not None
        assert upd.candidate is not None
        slot_dir = self.store.slot_dir(upd.candidate)
        host = self.slots.hosts.get(upd.model) or self.slots.new_host(upd.model)
        warm = host.previous
        try:
            # a rollback to the warm previous model needs no load at all
            candidate = warm if warm is not None and warm.path == slot_dir else host.load(slot_dir)
        except ModelRejected as exc:
            raise StepFailed(f"model_rejected: {exc.reason}") from None
        serving = host.serving
        baseline = host.health.since_mark().p95_ms if serving is not None else None
        details = {"load_ms": round(candidate.load_ms, 3), "baseline_p95_ms": baseline}
        if upd.mode is ServeMode.shadow:
            if serving is None:
                raise StepFailed(f"shadow mode needs a serving {upd.model} model")
            host.start_shadow(candidate)
        else:
            host.swap(candidate)
            self.slots.hosts.setdefault(upd.model, host)
        try:
            self.reporter.advance(installed(self.keeper.state, utcnow(), baseline), details)
        except BaseException:
            if self.keeper.state.phase is UpdatePhase.installing:  # not persisted: undo the swap
                self._undo_install(host, upd.model, upd.mode)
            raise

    def _undo_install(self, host: ModelHost, model: str, mode: ServeMode) -> None:
        """The candidate serves (or shadows) but ``installed`` could not be persisted: the update
        is about to fail, so what the state names as current serves again."""
        if mode is ServeMode.shadow:
            host.stop_shadow()
            return
        self.slots.rollback_host(host, model)
        self.slots.restore_previous(model)

    # ---------------------------------------------------------------- failing

    def fail(self, reason: str, details: dict[str, Any] | None = None) -> None:
        """Fail the update in flight. On a full disk, first give back the space the update took (its
        partial or complete download): persisting the failure and journaling its report need a few
        kilobytes, and the download is garbage once the update has failed anyway."""
        upd = self.keeper.state.update
        if upd is not None and reason.startswith("disk_full"):
            for rel in (upd.partial_path, upd.bundle_path):
                if rel:  # "" stands for a reused slot, which is not ours to delete
                    with contextlib.suppress(OSError):
                        (self.data_dir / rel).unlink(missing_ok=True)
        self.reporter.advance(fail(self.keeper.state, utcnow(), reason), details)


def _complete_download(final: Path, d: DesiredState) -> bool:
    """Whether ``final`` already holds the desired bundle: the download renamed it there, then the
    daemon died before it committed ``downloaded``. Anything else there is deleted."""
    if not final.exists():
        return False
    if final.stat().st_size == d.length and file_sha256(final) == (d.length, d.hashes["sha256"]):
        return True
    final.unlink(missing_ok=True)
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
