"""How the cloud tier gets its models (:class:`RepositorySync`): as a device does, from the
server's TUF image repository, installing only verified bundles with the device's own code
(:class:`~device_client.trust.TufVerifier`, the resumable download, :class:`~device_client.store.
StateStore`, :class:`~device_client.runtime.ModelHost`). A version no longer listed (revoked)
leaves; a refresh that fails keeps serving what is loaded."""

from __future__ import annotations

import logging
import shutil
import tarfile
import threading
from pathlib import Path

from device_client.fetcher import HttpSettings, download_resumable
from device_client.protocol import BundleError
from device_client.protocol.bundle import read_manifest
from device_client.runtime import LoadedModel, ModelHost, ModelRejected
from device_client.store import StateStore
from device_client.trust import Rejected, RepositoryUnavailable, TufVerifier, target_url
from server.cloud.metrics import CloudMetrics
from server.cloud.registry import ModelRegistry, ServedModel
from server.cloud.selection import Candidate, ModelSpec, select

log = logging.getLogger(__name__)

#: bundle downloads: caps and bounds (as the device daemon's defaults)
MAX_BUNDLE_BYTES = 2 * 1024**3
DOWNLOAD_DEADLINE_S = 3600.0
DOWNLOAD_ATTEMPTS = 3

Key = tuple[str, str]  # (target path, sha256)


class Stopping(Exception):
    """The tier is stopping: a download in progress gives up (its partial file stays)."""


class RepositorySync:
    """Keeps the :class:`ModelRegistry` in step with the image repository (one thread calls it).

    Every :meth:`refresh`: a fresh ``tuf.ngclient`` refresh lists the targets;
    :func:`~server.cloud.selection.select` picks those to serve; each new one is downloaded with the
    device's resumable download (checked against the signed length and SHA-256), its
    ``bundle.json`` must name the model, version, release and variant the signed target claims, it
    is extracted safely into a slot and loaded, validated and warmed by the model's ``ModelHost``
    off the request path. Only then is the new default swapped in (a reference rebind: requests in
    flight finish on the model they started with) and the table replaced. A bundle that fails
    validation is not tried again until the repository lists other content under its path; a
    failed download is retried at the next refresh."""

    def __init__(
        self,
        *,
        tuf: TufVerifier,
        http: HttpSettings,
        targets_url: str,
        store: StateStore,
        registry: ModelRegistry,
        specs: dict[str, ModelSpec],
        variant: str,
        metrics: CloudMetrics,
        intra_op_threads: int = 1,
        stop: threading.Event | None = None,
    ) -> None:
        self.tuf = tuf
        self.stop = stop or threading.Event()
        self.http = http
        self.targets_url = targets_url
        self.store = store
        self.registry = registry
        self.specs = specs
        self.variant = variant
        self.metrics = metrics
        self.intra_op_threads = intra_op_threads
        #: loaded models by the target they came from (the served ones and each host's previous)
        self._loaded: dict[Key, LoadedModel] = {}
        #: targets whose bundle failed validation, with the reason
        self.rejected: dict[Key, str] = {}

    def new_host(self, name: str) -> ModelHost:
        # nice rather than SCHED_IDLE: on a saturated server an idle-class load might never run
        return ModelHost(name, intra_op_threads=self.intra_op_threads, load_idle=False, load_nice=10)

    # ---------------------------------------------------------------- refresh

    def refresh(self) -> bool:
        """One refresh; False (nothing changed) when the repository could not be read."""
        try:
            listed = self.tuf.listed_targets()
        except RepositoryUnavailable as exc:
            self.metrics.sync("unreachable")
            log.warning("image repository unreachable: %s; serving what is loaded", exc.message)
            return False
        except Rejected as exc:
            self.metrics.sync("refused")
            log.error("image repository refused (%s); serving what is loaded", exc.reason)
            return False
        chosen = select(
            {p: (t.length, t.hashes, t.custom) for p, t in listed.items()}, self.specs, self.variant
        )
        listed_keys = {(p, t.hashes.get("sha256", "")) for p, t in listed.items()}
        self.rejected = {k: why for k, why in self.rejected.items() if k in listed_keys}
        before = self.registry.loaded()
        table: dict[str, ServedModel] = {}
        for name, candidates in chosen.items():
            served = self._serve(name, candidates, listed_keys)
            if served is not None:
                table[name] = served
        self._publish(table, before)
        downloads = {p for cs in chosen.values() for c in cs for p in self._download_paths(c)}
        for leftover in self.store.downloads_dir.iterdir():  # partial downloads of what is gone
            if leftover not in downloads:
                leftover.unlink(missing_ok=True)
        self.metrics.sync("ok")
        return True

    def _serve(self, name: str, candidates: list[Candidate], listed_keys: set[Key]) -> ServedModel | None:
        current = self.registry.get(name)
        host = current.host if current is not None else self.new_host(name)
        ready = [m for m in (self._obtain(host, c) for c in candidates) if m is not None]
        serving = current.default if current is not None else None
        if (
            serving is not None
            and candidates[0].version not in {m.version for m in ready}
            and not any(m is serving for m in ready)
            and self._key_of(serving) in listed_keys
        ):
            ready.append(serving)  # the newest failed to install: the default serving stays (still listed)
        if not ready:
            return None
        ready.sort(key=lambda m: m.manifest.release, reverse=True)
        default, others = ready[0], {m.version: m for m in ready[1:]}
        if host.serving is not default:
            host.swap(default)  # the replaced default stays warm as the host's previous...
        if host.previous is not None and self._key_of(host.previous) not in listed_keys:
            host.set_previous(None)  # ...unless it is revoked
        return ServedModel(host, others)

    def _key_of(self, model: LoadedModel) -> Key | None:
        return next((k for k, m in self._loaded.items() if m is model), None)

    def _obtain(self, host: ModelHost, c: Candidate) -> LoadedModel | None:
        key = (c.path, c.sha256)
        if key in self._loaded:
            return self._loaded[key]
        if key in self.rejected:
            return None
        try:
            model = self._install(host, c)
        except (ModelRejected, BundleError) as exc:
            reason = exc.reason if isinstance(exc, ModelRejected) else str(exc)
            self.rejected[key] = reason
            self.metrics.sync("bundle_rejected")
            log.error("%s %s (%s) refused: %s", c.model, c.version, c.path, reason)
            return None
        except Exception as exc:  # a download or disk problem: try again at the next refresh
            self.metrics.sync("install_failed")
            log.warning("%s %s (%s) not installed yet: %s", c.model, c.version, c.path, exc)
            return None
        self._loaded[key] = model
        log.info("installed %s %s (release %d) from %s", c.model, c.version, c.release, c.path)
        return model

    def _download_paths(self, c: Candidate) -> tuple[Path, Path]:
        return self.store.download_paths(c.model, c.version, c.variant, c.sha256)

    def _install(self, host: ModelHost, c: Candidate) -> LoadedModel:
        partial, final = self._download_paths(c)
        if not final.exists():
            download_resumable(
                target_url(self.targets_url, c.path, c.sha256),
                partial,
                expected_length=c.length,
                expected_sha256=c.sha256,
                max_bytes=MAX_BUNDLE_BYTES,
                deadline_s=DOWNLOAD_DEADLINE_S,
                http=self.http,
                attempts=DOWNLOAD_ATTEMPTS,
                final_path=final,
                on_progress=self._check_stop,
            )
        try:
            try:
                with tarfile.open(final, mode="r:") as tar:
                    manifest = read_manifest(tar)
            except (tarfile.TarError, EOFError) as exc:
                raise BundleError(f"not a readable tar file: {exc}") from None
            claimed = (manifest.name, manifest.version, manifest.release, manifest.variant)
            if claimed != (c.model, c.version, c.release, c.variant):
                raise BundleError(f"bundle.json names {claimed}, the signed target {c.path!r} another")
            slot = self.store.install_bundle(final, replace=True)
        finally:
            final.unlink(missing_ok=True)
        return host.load(self.store.slot_dir(slot))

    def _check_stop(self, received: int, total: int) -> None:
        if self.stop.is_set():
            raise Stopping(f"stopping at {received} of {total} bytes")

    # ---------------------------------------------------------------- start without the repository

    def serve_installed(self) -> None:
        """Serve the bundles installed by an earlier run (the repository is unreachable at start):
        they were verified when installed. The next successful refresh takes over."""
        table: dict[str, ServedModel] = {}
        by_model: dict[str, list[LoadedModel]] = {}
        for slot in self.store.scan_slots():
            spec = self.specs.get(slot.model)
            if spec is None or slot.variant != self.variant:
                continue
            try:
                model = self.new_host(slot.model).load(self.store.slot_dir(slot))
                by_model.setdefault(slot.model, []).append(model)
            except ModelRejected as exc:
                log.error("installed %s %s does not load: %s", slot.model, slot.version, exc.reason)
        for name, models in by_model.items():
            spec = self.specs[name]
            models.sort(key=lambda m: m.manifest.release, reverse=True)
            keep = [m for i, m in enumerate(models) if (spec.latest and i == 0) or m.version in spec.pinned]
            if keep:
                host = self.new_host(name)
                host.swap(keep[0])
                table[name] = ServedModel(host, {m.version: m for m in keep[1:]})
                for m in keep:  # never a listed key: the first refresh installs afresh what it lists
                    self._loaded[(f"installed:{m.path}", "")] = m
        self._publish(table, {})
        log.warning(
            "serving %s from installed bundles until the repository can be read", self.registry.loaded()
        )

    # ---------------------------------------------------------------- publish and clean up

    def _publish(self, table: dict[str, ServedModel], before: dict[str, list[str]]) -> None:
        """Replace the table; ``before`` is what served before this refresh swapped anything."""
        self.registry.publish(table)
        self.registry.synced = True
        after = self.registry.loaded()
        if after != before:
            log.info("serving %s", after)
        keep_ids = {id(m) for s in table.values() for m in s.versions()}
        keep_ids |= {id(s.host.previous) for s in table.values() if s.host.previous is not None}
        self._loaded = {k: m for k, m in self._loaded.items() if id(m) in keep_ids}
        self._gc({m.path for m in self._loaded.values()})

    def _gc(self, keep: set[Path]) -> None:
        """Delete slots nothing serves any more, and staging leftovers."""
        for model_dir in [p for p in self.store.models_dir.iterdir() if p.is_dir()]:
            for slot_dir in [p for p in model_dir.iterdir() if p.is_dir()]:
                if slot_dir not in keep:
                    shutil.rmtree(slot_dir, ignore_errors=True)
            if not any(model_dir.iterdir()):
                model_dir.rmdir()
        for leftover in self.store.staging_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
