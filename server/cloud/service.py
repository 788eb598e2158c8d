"""The cloud tier's use cases (:class:`CloudService`): built from the settings, it owns the model
registry, the repository sync thread, the per-model batchers, the admission gate, caller
authentication and the per-device rate limit. The HTTP layer (:mod:`server.cloud.app`) calls it."""

from __future__ import annotations

import logging
import math
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from device_client.fetcher import HttpSettings, url_origin
from device_client.protocol.messages import VARIANT_RE
from device_client.runtime import BadInput, LoadedModel
from device_client.store import StateStore
from device_client.trust import TufVerifier
from server.cloud.auth import Caller, CallerAuth
from server.cloud.batcher import AdmissionGate, Batcher, Outputs
from server.cloud.errors import BadRequest, ModelNotFound, RateLimited, Unauthorized, Unavailable
from server.cloud.metrics import CloudMetrics
from server.cloud.registry import ModelRegistry
from server.cloud.selection import parse_model_specs
from server.cloud.sync import RepositorySync
from server.cloud.tensors import DATATYPES, datatype_of
from server.cloud.tls import client_ca
from server.config import Settings
from server.db import Database
from server.examples.service import collect_cap, keep
from server.http.ratelimit import TokenBucket
from server.rollouts.desired_repository import DesiredRepository

log = logging.getLogger(__name__)

TUF_DIR = "tuf"


class CloudConfigError(ValueError):
    """Settings the cloud tier cannot start with (the message says which and why)."""


def newest_root(metadata_dir: Path) -> Path | None:
    """The highest ``N.root.json`` of a repository's metadata directory."""
    roots = [(int(p.name.split(".")[0]), p) for p in metadata_dir.glob("*.root.json") if p.name[0].isdigit()]
    return max(roots)[1] if roots else None


def trust_anchor(settings: Settings) -> Path:
    """The TUF root to trust at first start: ``cloud_tuf_root``, else the newest root of the
    repository directory on this host."""
    if settings.cloud_tuf_root is not None:
        if not settings.cloud_tuf_root.is_file():
            raise CloudConfigError(f"FLEET_CLOUD_TUF_ROOT {settings.cloud_tuf_root} is not a file")
        return settings.cloud_tuf_root
    found = newest_root(settings.repo_dir / "metadata")
    if found is None:
        raise CloudConfigError(
            f"no TUF root to trust: set FLEET_CLOUD_TUF_ROOT to the repository's root.json "
            f"(none found under {settings.repo_dir / 'metadata'})"
        )
    return found


class CloudService:
    """Everything a running cloud tier holds; :meth:`start` and :meth:`stop` run its threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            specs = parse_model_specs(settings.cloud_models)
        except ValueError as exc:
            raise CloudConfigError(f"FLEET_CLOUD_MODELS: {exc}") from None
        if not VARIANT_RE.fullmatch(settings.cloud_variant):
            raise CloudConfigError(f"FLEET_CLOUD_VARIANT: invalid variant {settings.cloud_variant!r}")
        self.model_names = sorted(specs)
        if settings.cloud_tls_cert is not None:
            for what, path in (
                ("FLEET_CLOUD_TLS_CERT", settings.cloud_tls_cert),
                ("FLEET_CLOUD_TLS_KEY", settings.cloud_tls_key),
                ("FLEET_CLOUD_CLIENT_CA (default: the fleet CA in FLEET_KEY_DIR)", Path(client_ca(settings))),
            ):
                if path is None or not path.is_file():
                    raise CloudConfigError(f"{what}: {path} is not a file")
        data_dir = settings.cloud_dir
        tuf_dir = data_dir / TUF_DIR
        tuf_dir.mkdir(parents=True, exist_ok=True)
        if not (tuf_dir / "root.json").exists():
            shutil.copyfile(trust_anchor(settings), tuf_dir / "root.json")
        server_url = (settings.cloud_server_url or settings.public_url).rstrip("/")
        metadata_url = f"{server_url}/tuf/metadata/"
        targets_url = settings.targets_url or f"{server_url}/tuf/targets/"
        token = settings.cloud_token.get_secret_value() if settings.cloud_token else None
        if token is None and not settings.targets_url:
            raise CloudConfigError(
                "FLEET_CLOUD_TOKEN is not set: the server gives bundles only to a device or admin token "
                "(create one with `fleet admin token create --role cloud`)"
            )
        http = HttpSettings(
            token=token,
            token_origin=url_origin(metadata_url),  # never to a CDN serving the targets
            server_ca=settings.cloud_server_ca,
            user_agent="fleetota-cloud",
        )
        self.metrics = CloudMetrics()
        self.registry = ModelRegistry()
        self.gate = AdmissionGate(settings.cloud_max_queue)
        self.db = Database(settings.database_url)
        self.auth = CallerAuth(self.db, cache_s=settings.cloud_auth_cache_s)
        self.rate = (
            TokenBucket(settings.cloud_rate_per_s, settings.cloud_rate_burst)
            if settings.cloud_rate_per_s > 0
            else None
        )
        self._stop = threading.Event()
        self.sync = RepositorySync(
            tuf=TufVerifier(tuf_dir, metadata_url, targets_url, http),
            http=http,
            targets_url=targets_url,
            store=StateStore(data_dir),
            registry=self.registry,
            specs=specs,
            variant=settings.cloud_variant,
            metrics=self.metrics,
            intra_op_threads=settings.cloud_intra_op_threads,
            stop=self._stop,
        )
        self._batchers: dict[str, Batcher] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if not specs:
            log.warning("FLEET_CLOUD_MODELS names no model: nothing will be served")

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> CloudService:
        self._thread = threading.Thread(target=self._sync_forever, name="fleet-cloud-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()
        self.db.dispose()

    def _sync_forever(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                ok = self.sync.refresh()
                if first and not ok:
                    self.sync.serve_installed()
                first = False
            except Exception:  # the thread must outlive any one refresh
                log.exception("repository refresh failed; serving what is loaded")
                self.metrics.sync("error")
            self._stop.wait(self.settings.cloud_refresh_s)

    # ---------------------------------------------------------------- callers

    def authenticate(self, bearer: str | None, certificate: bytes | None) -> Caller:
        """The caller by its client certificate, else its bearer token (401/403/503)."""
        if certificate is not None:
            return self.auth.by_certificate(certificate)
        if bearer is None:
            raise Unauthorized("a device token (Authorization: Bearer) or client certificate is required")
        return self.auth.by_token(bearer)

    def admit(self, caller: Caller) -> None:
        """Spend one token of the caller's bucket (429 with Retry-After when empty)."""
        if self.rate is None:
            return
        wait = self.rate.take(caller.device_id)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise RateLimited(
                f"device {caller.device_id!r} is over its inference rate; retry in {retry} s", retry
            )

    # ---------------------------------------------------------------- inference

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        model = self.registry.lookup(name, version)
        if model is None:
            if self.registry.get(name) is None:
                raise ModelNotFound(
                    f"unknown model {name!r} (served: {', '.join(self.registry.models) or 'none'})"
                )
            raise ModelNotFound(f"model {name!r} has no version {version!r} here")
        return model

    def check_inputs(
        self, model: LoadedModel, inputs: dict[str, np.ndarray], datatypes: dict[str, str]
    ) -> None:
        """400 unless the inputs are exactly the model's, with its datatypes and fixed dimensions."""
        for spec in model.manifest.inputs:
            given = datatypes.get(spec.name)
            if given is not None and DATATYPES[given] != spec.dtype:
                raise BadRequest(
                    f"input {spec.name!r} has datatype {given}, model {model.name} {model.version} "
                    f"takes {datatype_of(spec.dtype)}"
                )
        try:
            model.check_inputs(inputs)
        except BadInput as exc:
            raise BadRequest(str(exc)) from None

    def enter(self) -> None:
        """Admit one request to the queue (503 when it is full), before its body is read: so the
        bodies in memory are bounded too. :meth:`submit` hands the place over to the request's
        future; a request refused before that gives it back with :meth:`leave`."""
        if not self.gate.try_enter():
            raise Unavailable(
                f"the inference queue is full ({self.gate.capacity} requests); retry shortly",
                reason="queue_full",
            )

    def leave(self) -> None:
        self.gate.leave()

    def submit(self, model: LoadedModel, inputs: dict[str, np.ndarray]) -> Future[Outputs]:
        """Queue a checked, admitted request; its place in the queue is freed once it is answered."""
        future = self._batcher(model.name).submit(model, inputs)
        future.add_done_callback(lambda _: self.gate.leave())
        return future

    def _batcher(self, name: str) -> Batcher:
        with self._lock:
            batcher = self._batchers.get(name)
            if batcher is None:
                batcher = self._batchers[name] = Batcher(
                    name,
                    window_s=self.settings.cloud_batch_window_ms / 1000,
                    max_batch=self.settings.cloud_max_batch,
                    on_batch=self.metrics.batch,
                )
            return batcher

    # ---------------------------------------------------------------- hard examples

    def keep_example(
        self, caller: Caller, model: LoadedModel, inputs: dict[str, np.ndarray], outputs: Outputs
    ) -> None:
        """Store an answered request the caller marked ``fleet_collect``, if the routing policy of
        its signed DesiredState turns ``collect`` on for this model: under the policy's
        ``collect.max_bytes`` for the model and ``cloud_examples_max_bytes`` for all (0: never).
        A failure is logged and counted, never the caller's."""
        ceiling = self.settings.cloud_examples_max_bytes
        if ceiling <= 0:
            self.metrics.example("disabled")
            return
        try:
            with self.db.session_scope() as session:
                record = DesiredRepository(session).get(caller.device_id)
                signed = record.envelope.get("signed", {}) if record is not None else {}
                cap = collect_cap(signed.get("routing"), model.name, ceiling)
                if cap <= 0:
                    result = "not_asked"
                else:
                    kept = keep(
                        session, model=model.name, version=model.version, device_id=caller.device_id,
                        inputs=inputs, outputs=outputs, model_cap=cap, max_bytes=ceiling,
                    )  # fmt: skip
                    result = "kept" if kept else "too_large"
        except Exception:
            log.exception("could not store a hard example of %s", model.name)
            self.metrics.example("error")
            return
        self.metrics.example(result)

    # ---------------------------------------------------------------- health

    def readiness(self) -> tuple[bool, str]:
        """Ready once every configured model serves a version."""
        if not self.registry.synced:
            return False, "the image repository has not been read yet"
        missing = [n for n in self.model_names if self.registry.lookup(n) is None]
        if missing or not self.model_names:
            return False, f"not loaded: {', '.join(missing) or 'no model configured (FLEET_CLOUD_MODELS)'}"
        return True, "ready"

    def render_metrics(self) -> str:
        loaded = self.registry.loaded()
        gauges: dict[str, tuple[str, list[tuple[dict[str, str], float]]]] = {
            "fleet_cloud_queue_depth": (
                "requests admitted and not yet answered",
                [({}, float(self.gate.depth))],
            ),
            "fleet_cloud_queue_capacity": ("FLEET_CLOUD_MAX_QUEUE", [({}, float(self.gate.capacity))]),
            "fleet_cloud_ready": ("1 when every configured model serves", [({}, float(self.readiness()[0]))]),
            "fleet_cloud_model_loaded": (
                "served model versions (1; default: the version unversioned requests get)",
                [
                    ({"model": n, "version": v, "default": str(i == 0).lower()}, 1.0)
                    for n, versions in loaded.items()
                    for i, v in enumerate(versions)
                ],
            ),
            "fleet_cloud_bundles_rejected": (
                "bundles that failed validation",
                [({}, float(len(self.sync.rejected)))],
            ),
        }
        return self.metrics.render(gauges)
