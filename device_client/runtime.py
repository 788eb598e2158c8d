"""The onnxruntime host: load, validate, warm, hot-swap, roll back, shadow.

Loading (:func:`load_slot`). A slot directory holds an extracted bundle. Loading creates a *new*
``onnxruntime.InferenceSession`` (CPU, ``intra_op_threads`` threads, one inter-op thread), checks
the session's inputs and outputs against the manifest's TensorSpecs (names, element types, ranks,
fixed dimensions), runs the ``validation.npz`` inputs and compares the outputs with the recorded ones
(``allclose`` with the bundle's rtol/atol, or ``top1``), then warms the session up with a few more
runs. Any failure raises :class:`ModelRejected` and nothing changes in the host.

Serving (:class:`ModelHost`). The serving model is one attribute holding an immutable
:class:`LoadedModel`. ``infer`` reads it once and uses that object for the whole request; a swap
rebinds the attribute. So a swap never blocks a request and no request waits for a load (loading,
validation and warm-up all happen before the swap, off the request path): in-flight requests finish
on the old session, new ones go to the new one. Every request is timed with ``perf_counter_ns`` into
the :class:`~device_client.health.HealthRecorder`; an exception or a non-finite output (NaN/Inf)
counts as an error. Exceptions propagate as :class:`InferenceError`; NaN outputs are returned as they
are. Inputs that do not fit the signature raise :class:`BadInput` and are not counted (the caller's
fault, not the model's).

Keep-previous-warm policy. With ``keep_previous_warm`` (the default) the host keeps exactly one
previous :class:`LoadedModel` in memory: the one the last swap replaced. ``rollback`` is then a
reference flip. After a rollback no previous model stays loaded (the model rolled back from is
released; the daemon may name an older slot with :meth:`ModelHost.set_previous`, which is kept cold).
Without ``keep_previous_warm`` only the previous slot's path is kept and ``rollback`` reloads (and
re-validates) it before flipping, which costs a full load but halves the memory.

Low-priority loading. On a small device the load competes with live requests for the same cores, so
:meth:`ModelHost.load` runs load + validation + warm-up in a short-lived thread of its own at a low
CPU priority. By default (``load_idle``) that thread runs under Linux's ``SCHED_IDLE`` policy: it
gets a core only when no normal thread wants it, so a load never preempts a request. A nice value
alone (``load_nice``, 10 by default, used where ``SCHED_IDLE`` is off or refused) is not enough: the
scheduler still gives a niced thread whole time slices of a few milliseconds, and a request that
waits behind one misses its p99 (``bench/swap.py`` measured a swap-window p99 ratio of 2.1-2.8 with
nice 10 against 1.3-2.1 with ``SCHED_IDLE``). The price: a device whose cores are saturated by
requests installs slowly (the load gets what little CPU is left), which is the right order for a
device whose job is to answer. onnxruntime releases the GIL while it builds and runs the session, so
the loader holds the GIL only for its short Python steps. The thread ends with the load, so no other
work inherits the priority.

Shadow mode. :meth:`ModelHost.start_shadow` runs a candidate on a random sample
(``shadow_sample_rate``) of live requests in one background thread fed by a bounded queue: a
sampled request whose queue slot is not free is dropped (and counted), never waited for. The
candidate's outputs are compared with what the serving model answered (top-1 equality for 2-D
outputs with more than one class, else allclose) and agreement and shadow latency go into the
recorder. The candidate never answers a caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from .config import DeviceSettings
from .health import HealthRecorder
from .protocol.bundle import (
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    ORT_DTYPES,
    VALIDATION_MEMBER,
    BundleManifest,
    TensorSpec,
)

log = logging.getLogger(__name__)


class ModelRejected(Exception):
    """A model failed to load, its signature or its validation vectors; it never serves."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadInput(ValueError):
    """A request's inputs do not fit the serving model's signature."""


class InferenceError(RuntimeError):
    """The serving model raised while running a request."""


class NoModel(RuntimeError):
    """No model is loaded (or no previous model is known, for a rollback)."""


@dataclass(frozen=True)
class _InputCheck:
    name: str
    dtype: np.dtype[Any]
    ndim: int
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of every fixed dimension


@dataclass(frozen=True)
class LoadedModel:
    """A validated, warmed session and its manifest. Immutable: swapped as a whole."""

    manifest: BundleManifest
    session: ort.InferenceSession
    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    checks: tuple[_InputCheck, ...]
    load_ms: float

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def input_spec(self, name: str) -> TensorSpec:
        for spec in self.manifest.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Raise :class:`BadInput` unless ``inputs`` has exactly the model's inputs, well typed."""
        if len(inputs) != len(self.checks):
            raise BadInput(f"expected inputs {list(self.input_names)}, got {sorted(inputs)}")
        for c in self.checks:
            arr = inputs.get(c.name)
            if arr is None:
                raise BadInput(f"missing input {c.name!r}; expected {list(self.input_names)}")
            if not isinstance(arr, np.ndarray):
                raise BadInput(f"input {c.name!r} is not a numpy array")
            if arr.dtype != c.dtype:
                raise BadInput(f"input {c.name!r} has dtype {arr.dtype}, expected {c.dtype}")
            if arr.ndim != c.ndim:
                raise BadInput(f"input {c.name!r} has rank {arr.ndim}, expected {c.ndim}")
            for axis, size in c.fixed:
                if arr.shape[axis] != size:
                    raise BadInput(f"input {c.name!r} has shape {arr.shape}; axis {axis} must be {size}")

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(self.output_names), dict(inputs))


@dataclass(frozen=True)
class InferenceResult:
    outputs: dict[str, np.ndarray]
    model: str
    version: str


# --------------------------------------------------------------------------- loading


def _all_finite(outputs: Sequence[np.ndarray]) -> bool:
    for out in outputs:  # noqa: SIM110  (a plain loop is cheaper than all() on the request path)
        if out.dtype.kind in "fc" and not np.isfinite(out).all():
            return False
    return True


def _check_signature(kind: str, specs: list[TensorSpec], args: list[Any]) -> None:
    expected = [s.name for s in specs]
    actual = [a.name for a in args]
    if sorted(expected) != sorted(actual):
        raise ModelRejected(f"{kind} names {actual} differ from bundle.json {expected}")
    by_name = {a.name: a for a in args}
    for spec in specs:
        arg = by_name[spec.name]
        try:
            want = np.dtype(spec.dtype)
        except TypeError:
            raise ModelRejected(f"bundle.json {kind} {spec.name!r}: unknown dtype {spec.dtype!r}") from None
        have = ORT_DTYPES.get(arg.type)
        if have is None or np.dtype(have) != want:
            raise ModelRejected(f"{kind} {spec.name!r} is {arg.type}, bundle.json says {spec.dtype}")
        shape = list(arg.shape)
        if len(shape) != len(spec.shape):
            raise ModelRejected(
                f"{kind} {spec.name!r} has rank {len(shape)}, bundle.json says {len(spec.shape)}"
            )
        for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if isinstance(got, int) and isinstance(want, int) and got != want:
                raise ModelRejected(f"{kind} {spec.name!r} axis {axis} is {got}, bundle.json says {want}")


def outputs_agree(
    expected: Sequence[np.ndarray], got: Sequence[np.ndarray], *, rtol: float, atol: float
) -> bool:
    """Shadow comparison: top-1 equality for 2-D outputs with >1 class, else allclose."""
    if len(expected) != len(got):
        return False
    for e, g in zip(expected, got, strict=True):
        if e.shape != g.shape:
            return False
        if e.ndim == 2 and e.shape[1] > 1:
            if not np.array_equal(np.argmax(e, axis=1), np.argmax(g, axis=1)):
                return False
        elif not np.allclose(e, g, rtol=rtol, atol=atol):
            return False
    return True


def _validate(model: LoadedModel, slot_dir: Path) -> dict[str, np.ndarray]:
    manifest = model.manifest
    try:
        with np.load(slot_dir / VALIDATION_MEMBER, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError, ...
        raise ModelRejected(f"unreadable {VALIDATION_MEMBER}: {exc.__class__.__name__}: {exc}") from None
    inputs: dict[str, np.ndarray] = {}
    for spec in manifest.inputs:
        key = f"inputs/{spec.name}"
        if key not in arrays:
            raise ModelRejected(f"{VALIDATION_MEMBER} lacks {key!r}")
        inputs[spec.name] = arrays[key]
    expected: list[np.ndarray] = []
    for name in model.output_names:
        key = f"outputs/{name}"
        if key not in arrays:
            raise ModelRejected(f"{VALIDATION_MEMBER} lacks {key!r}")
        expected.append(arrays[key])
    try:
        model.check_inputs(inputs)
    except BadInput as exc:
        raise ModelRejected(f"validation inputs do not fit the signature: {exc}") from None
    try:
        got = model.run(inputs)
    except Exception as exc:
        raise ModelRejected(f"validation run failed: {exc}") from None
    v = manifest.validation
    if v.compare == "top1":
        e, g = expected[0], got[0]
        if e.shape != g.shape or not np.array_equal(np.argmax(e, axis=-1), np.argmax(g, axis=-1)):
            raise ModelRejected(f"validation top-1 of {model.output_names[0]!r} differs from the recorded")
        return inputs
    for name, e, g in zip(model.output_names, expected, got, strict=True):
        if e.shape != g.shape:
            raise ModelRejected(f"validation output {name!r} has shape {g.shape}, recorded {e.shape}")
        if not np.allclose(g, e, rtol=v.rtol, atol=v.atol):
            worst = float(np.nanmax(np.abs(g.astype(np.float64) - e.astype(np.float64))))
            raise ModelRejected(
                f"validation output {name!r} differs from the recorded one"
                f" (max abs diff {worst:.3g}, rtol {v.rtol:g}, atol {v.atol:g})"
            )
    return inputs


def load_slot(slot_dir: Path, *, intra_op_threads: int = 1, warmup_runs: int = 3) -> LoadedModel:
    """Load, check, validate and warm the model in ``slot_dir``; raise :class:`ModelRejected`."""
    started = time.perf_counter()
    slot_dir = Path(slot_dir)
    try:
        manifest = BundleManifest.model_validate_json((slot_dir / MANIFEST_MEMBER).read_bytes())
    except (OSError, ValidationError, ValueError) as exc:
        raise ModelRejected(f"unreadable {MANIFEST_MEMBER}: {str(exc).splitlines()[0]}") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(slot_dir / MODEL_MEMBER), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelRejected(f"onnxruntime cannot load the model: {exc}") from None
    _check_signature("input", manifest.inputs, session.get_inputs())
    _check_signature("output", manifest.outputs, session.get_outputs())
    checks = []
    for spec in manifest.inputs:
        fixed = tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, int))
        checks.append(_InputCheck(spec.name, np.dtype(spec.dtype), len(spec.shape), fixed))
    model = LoadedModel(
        manifest=manifest,
        session=session,
        path=slot_dir,
        input_names=tuple(s.name for s in manifest.inputs),
        output_names=tuple(s.name for s in manifest.outputs),
        checks=tuple(checks),
        load_ms=0.0,
    )
    try:
        inputs = _validate(model, slot_dir)
    except ModelRejected:
        raise
    except Exception as exc:  # e.g. a comparison the recorded arrays' dtypes do not allow
        raise ModelRejected(f"validation failed: {exc.__class__.__name__}: {exc}") from None
    try:
        for _ in range(warmup_runs):
            model.run(inputs)
    except Exception as exc:
        raise ModelRejected(f"warm-up failed: {exc.__class__.__name__}: {exc}") from None
    load_ms = (time.perf_counter() - started) * 1000
    log.info("loaded %s %s from %s in %.1f ms", manifest.name, manifest.version, slot_dir, load_ms)
    return LoadedModel(**{**model.__dict__, "load_ms": load_ms})


def _lower_priority(nice: int, idle: bool) -> None:
    """Lower the calling thread's CPU priority: ``SCHED_IDLE`` if asked and allowed, else nice."""
    if idle:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
            return
        except (OSError, AttributeError):
            pass  # not Linux, or refused (seccomp, RLIMIT): fall back to nice
    if nice > 0:
        with contextlib.suppress(OSError, AttributeError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)


def _run_low_priority(fn: Callable[[Path], LoadedModel], arg: Path, nice: int, idle: bool) -> LoadedModel:
    """Run ``fn(arg)`` in a fresh thread at a lower CPU priority (Linux: per-thread policy and nice)."""
    box: dict[str, Any] = {}

    def target() -> None:
        _lower_priority(nice, idle)
        try:
            box["result"] = fn(arg)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="fleet-loader", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


# --------------------------------------------------------------------------- shadow


_STOP = object()


class _ShadowRunner:
    def __init__(
        self,
        candidate: LoadedModel,
        recorder: HealthRecorder,
        *,
        sample_rate: float,
        queue_size: int,
        rtol: float,
        atol: float,
    ) -> None:
        self.candidate = candidate
        self.recorder = recorder
        self.sample_rate = sample_rate
        self.rtol = rtol
        self.atol = atol
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._random = random.random
        self._thread = threading.Thread(target=self._work, name=f"shadow-{candidate.name}", daemon=True)
        self._thread.start()

    def offer(self, inputs: Mapping[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        """Maybe queue a copy of one request for the candidate; never blocks."""
        if self.sample_rate < 1.0 and self._random() >= self.sample_rate:
            return
        item = ({k: np.array(v, copy=True) for k, v in inputs.items()}, [o.copy() for o in outputs])
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.recorder.record_shadow_drop()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            inputs, expected = item
            t0 = time.perf_counter_ns()
            try:
                got = self.candidate.run(inputs)
            except Exception:
                self.recorder.record_shadow(time.perf_counter_ns() - t0, agreed=False, error=True)
                continue
            dt = time.perf_counter_ns() - t0
            finite = _all_finite(got)
            agreed = finite and outputs_agree(expected, got, rtol=self.rtol, atol=self.atol)
            self.recorder.record_shadow(dt, agreed=agreed, error=not finite)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued samples, then stop the worker."""
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)


# --------------------------------------------------------------------------- host


class ModelHost:
    """Serves one model name; hot-swaps, rolls back and shadows without blocking requests."""

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
        self._shadow: _ShadowRunner | None = None
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

    def infer(self, inputs: Mapping[str, np.ndarray]) -> InferenceResult:
        """Run one request on whichever model serves at the moment it starts."""
        model = self._serving  # one read: this request stays on this model
        if model is None:
            raise NoModel(f"no model {self.name!r} is loaded")
        model.check_inputs(inputs)
        t0 = time.perf_counter_ns()
        try:
            outputs = model.session.run(None, inputs)  # type: ignore[arg-type]
        except Exception as exc:
            self.health.record(time.perf_counter_ns() - t0, ok=False)
            raise InferenceError(f"{model.name} {model.version}: {exc}") from exc
        self.health.record(time.perf_counter_ns() - t0, ok=_all_finite(outputs))
        shadow = self._shadow
        if shadow is not None:
            shadow.offer(inputs, outputs)
        return InferenceResult(dict(zip(model.output_names, outputs, strict=True)), model.name, model.version)

    # ---------------------------------------------------------------- admin path

    def load(self, slot_dir: Path, *, urgent: bool = False) -> LoadedModel:
        """Load + validate + warm a slot (does not serve it); raises :class:`ModelRejected`.

        At low CPU priority while a model serves requests, unless ``urgent`` (a cold rollback: the
        model serving now misbehaves, so getting away from it matters more than the latency of the
        requests it answers). With nothing serving yet (start-up) there is nothing to protect."""
        low = (self.load_nice > 0 or self.load_idle) and not urgent and self._serving is not None
        if low and sys.platform.startswith("linux"):
            model = _run_low_priority(self._loader, Path(slot_dir), self.load_nice, self.load_idle)
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
        self._shadow = _ShadowRunner(
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
