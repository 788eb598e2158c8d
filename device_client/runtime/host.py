"""The onnxruntime host (:class:`ModelHost`): serves one model name; hot-swaps, rolls back and
shadows without ever blocking a request."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DeviceSettings
from ..health import HealthRecorder
from .loader import LoadedModel, ModelRejected, all_finite, load_slot
from .priority import run_low_priority
from .shadow import ShadowRunner

log = logging.getLogger(__name__)


class InferenceError(RuntimeError):
    """The serving model raised while running a request."""


class NoModel(RuntimeError):
    """No model is loaded (or no previous model is known, for a rollback)."""


@dataclass(frozen=True)
class InferenceResult:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    #: CPU time of the inference thread for ``session.run`` (docs/architecture.md, "CPU and memory")
    cpu_ns: int | None = None


class ModelHost:
    """Serves one model name; hot-swaps, rolls back and shadows without blocking requests.

    Serving: the serving model is one attribute holding an immutable :class:`LoadedModel`.
    :meth:`infer` reads it once and uses that object for the whole request; a swap rebinds the
    attribute. So a swap never blocks a request and no request waits for a load (loading,
    validation and warm-up happen before the swap, off the request path, at low CPU priority:
    :func:`~.priority.run_low_priority`): in-flight requests finish on the old session, new ones go
    to the new one. Every request is timed with ``perf_counter_ns``, and the CPU time of the thread
    that runs it with ``thread_time_ns``, into the :class:`~device_client.health.HealthRecorder`;
    an exception or a non-finite output (NaN/Inf) counts as an error. Exceptions propagate as
    :class:`InferenceError`; NaN outputs are returned as they are. Inputs that do not fit the
    signature raise :class:`~.loader.BadInput` and are not counted (the caller's fault, not the model's).

    Keep-previous-warm policy: with ``keep_previous_warm`` (the default) the host keeps exactly one
    previous :class:`LoadedModel` in memory, the one the last swap replaced, and :meth:`rollback`
    is a reference flip. After a rollback no previous model stays loaded (the daemon may name an
    older slot with :meth:`set_previous`, which is kept cold). Without ``keep_previous_warm`` only
    the previous slot's path is kept and :meth:`rollback` reloads (and re-validates) it before
    flipping, which costs a full load but halves the memory.

    Shadow mode: :meth:`start_shadow` runs a candidate beside the serving model
    (:class:`~.shadow.ShadowRunner`); it never answers a caller."""

    def __init__(
        self,
        name: str,
        *,
        recorder: HealthRecorder | None = None,
        keep_previous_warm: bool = True,
        intra_op_threads: int = 1,
        warmup_runs: int = 3,
        shadow_sample_rate: float = 0.1,
        shadow_queue_size: int = 64,
        shadow_rtol: float = 1e-3,
        shadow_atol: float = 1e-4,
        loader: Callable[[Path], LoadedModel] | None = None,
        load_nice: int = 10,
        load_idle: bool = True,
    ) -> None:
        self.name = name
        self.load_nice = load_nice
        self.load_idle = load_idle
        self.health = recorder or HealthRecorder()
        self.keep_previous_warm = keep_previous_warm
        self.shadow_sample_rate = shadow_sample_rate
        self.shadow_queue_size = shadow_queue_size
        self.shadow_rtol = shadow_rtol
        self.shadow_atol = shadow_atol
        self._loader = loader or (
            lambda p: load_slot(p, intra_op_threads=intra_op_threads, warmup_runs=warmup_runs)
        )
        self._serving: LoadedModel | None = None
        self._previous: LoadedModel | None = None
        self._previous_path: Path | None = None
        self._shadow: ShadowRunner | None = None
        self._admin = threading.Lock()  # serialises swaps; requests never take it

    @classmethod
    def from_settings(cls, name: str, settings: DeviceSettings) -> ModelHost:
        return cls(
            name,
            recorder=HealthRecorder(reservoir_size=settings.probation_latency_samples),
            keep_previous_warm=settings.keep_previous_warm,
            intra_op_threads=settings.intra_op_threads,
            warmup_runs=settings.warmup_runs,
            shadow_sample_rate=settings.shadow_sample_rate,
            shadow_queue_size=settings.shadow_queue_size,
            shadow_rtol=settings.shadow_rtol,
            shadow_atol=settings.shadow_atol,
            load_nice=settings.load_nice,
            load_idle=settings.load_idle,
        )

    # ---------------------------------------------------------------- request path

    @property
    def serving(self) -> LoadedModel | None:
        return self._serving

    @property
    def previous(self) -> LoadedModel | None:
        """The previous model if it is kept warm."""
        return self._previous

    @property
    def shadow_candidate(self) -> LoadedModel | None:
        shadow = self._shadow
        return shadow.candidate if shadow is not None else None

    def infer(self, inputs: Mapping[str, np.ndarray], *, record: bool = True) -> InferenceResult:
        """Run one request on whichever model serves at the moment it starts. ``record=False``:
        the caller records the request in :attr:`health` itself (the routing layer, whose callers
        wait for the cloud too)."""
        model = self._serving  # one read: this request stays on this model
        if model is None:
            raise NoModel(f"no model {self.name!r} is loaded")
        model.check_inputs(inputs)
        t0 = time.perf_counter_ns()
        c0 = time.thread_time_ns()
        try:
            outputs = model.session.run(None, inputs)
        except Exception as exc:
            if record:
                self.health.record(time.perf_counter_ns() - t0, ok=False)
            raise InferenceError(f"{model.name} {model.version}: {exc}") from exc
        cpu = time.thread_time_ns() - c0
        if record:
            self.health.record(time.perf_counter_ns() - t0, ok=all_finite(outputs), cpu_ns=cpu)
        shadow = self._shadow
        if shadow is not None:
            shadow.offer(inputs, outputs)
        outs = dict(zip(model.output_names, outputs, strict=True))
        return InferenceResult(outs, model.name, model.version, cpu)

    # ---------------------------------------------------------------- admin path

    def load(self, slot_dir: Path, *, urgent: bool = False) -> LoadedModel:
        """Load + validate + warm a slot (does not serve it); raises :class:`ModelRejected`.

        At low CPU priority while a model serves requests, unless ``urgent`` (a cold rollback: the
        model serving now misbehaves, so getting away from it matters more than the latency of the
        requests it answers). With nothing serving yet (start-up) there is nothing to protect."""
        low = (self.load_nice > 0 or self.load_idle) and not urgent and self._serving is not None
        if low and sys.platform.startswith("linux"):
            model = run_low_priority(self._loader, Path(slot_dir), self.load_nice, self.load_idle)
        else:
            model = self._loader(Path(slot_dir))
        if model.name != self.name:
            raise ModelRejected(f"bundle is model {model.name!r}, this host serves {self.name!r}")
        return model

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        """Make ``new`` serve (a reference rebind); returns the model it replaced."""
        if new.name != self.name:
            raise ValueError(f"model {new.name!r} cannot serve as {self.name!r}")
        with self._admin:
            old = self._serving
            self._serving = new
            if old is not None and old is not new:
                self._previous = old if self.keep_previous_warm else None
                self._previous_path = old.path
            self.health.mark(cut=old.version if old is not None and old is not new else None)
            log.info("%s: now serving %s", self.name, new.version)
            return old

    def install(self, slot_dir: Path) -> LoadedModel:
        """Load a slot off the request path, then swap it in."""
        model = self.load(slot_dir)
        self.swap(model)
        return model

    def rollback(self) -> LoadedModel:
        """Serve the previous model again: a reference flip when it is kept warm."""
        with self._admin:
            prev = self._previous
            if prev is None:
                if self._previous_path is None:
                    raise NoModel(f"{self.name}: no previous model to roll back to")
                prev = self.load(self._previous_path, urgent=True)  # cold: reload and re-validate
            cut = self._serving.version if self._serving is not None else None
            self._serving = prev
            self._previous = None
            self._previous_path = None
            self.health.mark(cut=cut)
            log.info("%s: rolled back to %s", self.name, prev.version)
            return prev

    def set_previous(self, previous: LoadedModel | Path | None) -> None:
        """Name the model a later rollback returns to (a LoadedModel stays warm, a path is cold)."""
        with self._admin:
            if isinstance(previous, LoadedModel):
                self._previous, self._previous_path = previous, previous.path
            else:
                self._previous, self._previous_path = None, previous

    def start_shadow(self, candidate: LoadedModel, *, sample_rate: float | None = None) -> None:
        """Run ``candidate`` on a sample of live requests, off the callers' path."""
        if candidate.name != self.name:
            raise ValueError(f"model {candidate.name!r} cannot shadow {self.name!r}")
        self.stop_shadow()
        self.health.mark()
        self.health.reset_shadow_window()  # the previous candidate's comparisons are not this one's
        self._shadow = ShadowRunner(
            candidate,
            self.health,
            sample_rate=self.shadow_sample_rate if sample_rate is None else sample_rate,
            queue_size=self.shadow_queue_size,
            rtol=self.shadow_rtol,
            atol=self.shadow_atol,
        )

    def stop_shadow(self) -> LoadedModel | None:
        """Stop shadowing (after the queued samples are compared); returns the candidate."""
        shadow, self._shadow = self._shadow, None
        if shadow is None:
            return None
        shadow.stop()
        return shadow.candidate

    def status(self) -> dict[str, Any]:
        serving, prev, shadow = self._serving, self._previous, self.shadow_candidate
        return {
            "model": self.name,
            "version": serving.version if serving else None,
            "previous": prev.version if prev else None,
            "previous_warm": prev is not None,
            "shadow": shadow.version if shadow else None,
        }

    def close(self) -> None:
        self.stop_shadow()
