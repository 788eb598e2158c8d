"""The router: who answers one inference request, the edge model, the cloud model or a cached
cloud answer (docs/architecture.md, "Hybrid routing").

The edge model runs first in every mode (it is local and fast): its answer is the fallback ready
at once, the shapes a cloud answer must have, and the other half of the agreement sample. Cloud
problems never reach the caller: every request is answered exactly once, within the edge time plus
at most the policy's ``timeout_ms``. Only an edge failure propagates, as it does without routing.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..protocol.routing import CloudSpec, RoutingMode, RoutingPolicy
from .background import BoundedExecutor
from .breaker import CircuitBreaker
from .budget import DEFAULT_HOLD_S, TokenBucket
from .cache import AnswerCache, PutResult, cache_key
from .call import CloudCall, output_map, payload_for, to_edge
from .confidence import Confidence, ConfidenceError, compare_answers, read_confidence
from .oip import CloudAnswer, CloudFailure, OipClient
from .stats import AnswerPath, RoutingStats

log = logging.getLogger(__name__)

#: the edge model: inputs -> outputs by name (``lambda x: host.infer(x).outputs``)
EdgeFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
#: failures on the device's side of the call: they say nothing about the cloud's health
_OWN_FAILURES = frozenset({"unencodable", "bad_request", "internal"})


@dataclass(frozen=True)
class Answer:
    """One request's answer. ``reason``: ``edge_only``, ``confident``, ``escalated`` or
    ``cloud_first`` (the cloud answered), or why the cloud did not (``budget_limited``,
    ``breaker_open``, ``cloud_failed:<kind>``); ``fallback``: the cloud was wanted but the edge or
    the cache answered."""

    outputs: dict[str, np.ndarray]
    answered_by: AnswerPath
    reason: str
    confidence: float | None = None
    confident: bool | None = None
    fallback: bool = False
    cloud_version: str | None = None
    cloud_ms: float | None = None


class Router:
    """Routes requests per ``policy``. Thread-safe: callers may run :meth:`answer` at once."""

    def __init__(
        self,
        policy: RoutingPolicy,
        edge: EdgeFn,
        cloud_client: OipClient | None,
        cache: AnswerCache | None,
        budget: TokenBucket,
        breaker: CircuitBreaker,
        clock: Callable[[], float] = time.monotonic,
        stats: RoutingStats | None = None,
        *,
        cloud_workers: int = 8,
        audit_workers: int = 1,
        background_queue: int = 16,
        rand: Callable[[], float] = random.random,
        cloud_problem: str | None = None,
    ) -> None:
        self.policy = policy
        self.edge = edge
        self.client = cloud_client
        self.cache = cache if cache is not None and cache.enabled else None
        self.budget = budget
        self.breaker = breaker
        self.clock = clock
        self.stats = stats or RoutingStats(clock=clock)
        self._rand = rand
        #: why there is no cloud client, when there is none (shown in :meth:`status`)
        self.cloud_problem = cloud_problem
        self._call: CloudCall | None = None
        if cloud_client is not None and policy.cloud is not None:
            self._call = CloudCall(
                policy.cloud, policy.collect, cloud_client, workers=cloud_workers, rand=rand
            )
        self._audits = BoundedExecutor(audit_workers, background_queue, "fleet-audit")
        self._writes = BoundedExecutor(1, background_queue, "fleet-cache-write")

    @property
    def cloud(self) -> CloudSpec | None:
        return self.policy.cloud

    # ------------------------------------------------------------------ request path

    def answer(self, inputs: Mapping[str, np.ndarray]) -> Answer:
        """Answer one request (an edge failure propagates; nothing of the cloud's does)."""
        edge_out = self.edge(inputs)
        conf = self._confidence(edge_out)
        mode = self.policy.mode
        if mode is RoutingMode.edge_only or self.cloud is None:
            return self._done(self._edge(edge_out, conf, "edge_only"))
        if mode is RoutingMode.prefer_edge and conf is not None and conf.confident:
            self._maybe_audit(inputs, edge_out)
            return self._done(self._edge(edge_out, conf, "confident"))
        self.stats.count("escalations")
        try:
            answer = self._escalate(inputs, edge_out, conf)
        except Exception:  # a bug here must not cost the caller the edge answer
            log.exception("routing: escalation failed unexpectedly; the edge answers")
            self.stats.cloud_failed("internal")
            answer = self._edge(edge_out, conf, "cloud_failed:internal", fallback=True)
        return self._done(answer)

    def _escalate(
        self, inputs: Mapping[str, np.ndarray], edge_out: dict[str, np.ndarray], conf: Confidence | None
    ) -> Answer:
        cloud = self.policy.cloud
        assert cloud is not None
        try:
            payload = payload_for(cloud, inputs, edge_out)
        except CloudFailure as f:
            self.stats.cloud_failed(f.kind)
            return self._edge(edge_out, conf, f"cloud_failed:{f.kind}", fallback=True)
        key = self._key(payload)
        if self._call is None:
            self.stats.cloud_failed("unconfigured")
            return self._fallback(edge_out, conf, key, "cloud_failed:unconfigured")
        refused = self._gate(use_budget=self.policy.mode is not RoutingMode.cloud_only)
        if refused is not None:
            self.stats.count(refused)
            return self._fallback(edge_out, conf, key, refused)
        self.stats.count("cloud_calls")
        try:
            outputs, ans = self._call.ask(payload, edge_out, wait=True)
        except CloudFailure as f:
            self._failed(f)
            self.stats.cloud_failed(f.kind)
            log.debug("routing: cloud failed (%s): %s; falling back", f.kind, f)
            return self._fallback(edge_out, conf, key, f"cloud_failed:{f.kind}")
        self._succeeded(edge_out, outputs, ans, key)
        reason = "escalated" if self.policy.mode is RoutingMode.prefer_edge else "cloud_first"
        return Answer(
            {**edge_out, **outputs},
            "cloud",
            reason,
            *_conf(conf),
            cloud_version=ans.model_version,
            cloud_ms=ans.elapsed_ms,
        )

    def _confidence(self, edge_out: Mapping[str, np.ndarray]) -> Confidence | None:
        spec = self.policy.confidence
        if spec is None:
            return None
        try:
            return read_confidence(edge_out, spec)
        except ConfidenceError as exc:
            self.stats.count("confidence_errors")
            log.debug("routing: no confidence: %s", exc)
            return None

    def _key(self, payload: Mapping[str, np.ndarray]) -> str | None:
        """The cache key of ``payload``; None without a cache or for tensors with no stable bytes."""
        cloud = self.policy.cloud
        if self.cache is None or cloud is None:
            return None
        try:
            return cache_key(cloud.model, cloud.version, payload)
        except ValueError:
            return None

    def _gate(self, *, use_budget: bool) -> str | None:
        """None if a call may go now, else why not (a Retry-After hold counts as the budget)."""
        if self.budget.held():
            return "budget_limited"
        if not self.breaker.allow():
            return "breaker_open"
        if use_budget and not self.budget.try_acquire():
            self.breaker.record_neutral()
            return "budget_limited"
        return None

    def _failed(self, f: CloudFailure) -> None:
        if f.kind == "rate_limited":
            self.budget.hold_for(f.retry_after_s if f.retry_after_s is not None else DEFAULT_HOLD_S)
            self.breaker.record_neutral()
        elif f.kind in _OWN_FAILURES:
            self.breaker.record_neutral()
        else:
            opened = self.breaker.opened
            self.breaker.record_failure()
            if self.breaker.opened != opened:
                log.warning(
                    "routing: the cloud failed (%s: %s); not asking it for %g s",
                    f.kind,
                    f,
                    self.breaker.open_s,
                )

    def _succeeded(
        self,
        edge_out: Mapping[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        ans: CloudAnswer,
        key: str | None,
    ) -> None:
        self.breaker.record_success()
        self.stats.cloud_round_trip(ans.elapsed_ms)
        agreed = compare_answers(edge_out, outputs, self.policy.confidence, self.policy.agreement)
        if agreed is not None:
            self.stats.compared(agreed)
        # kept as the cloud model gave it (its own output names): a cached answer is the cloud's
        wanted = set(output_map(self.cloud, edge_out).values()) if self.cloud is not None else set()
        cloud_out = {n: a for n, a in ans.outputs.items() if n in wanted}
        if key is not None and not self._writes.submit(self._store, key, cloud_out, ans.model_version):
            self.stats.count("cache_write_skipped")

    def _store(self, key: str, outputs: dict[str, np.ndarray], model_version: str | None) -> None:
        cloud = self.policy.cloud
        if self.cache is None or cloud is None:
            return
        result = self.cache.put(
            key, outputs, model=cloud.model, version=cloud.version, model_version=model_version
        )
        if result in (PutResult.disk_full, PutResult.failed):
            self.stats.count("cache_write_skipped")

    def _fallback(
        self, edge_out: dict[str, np.ndarray], conf: Confidence | None, key: str | None, reason: str
    ) -> Answer:
        """A cached cloud answer for the same input, else the edge's."""
        cached = self.cache.get(key) if self.cache is not None and key is not None else None
        if cached is not None:
            try:  # an answer stored for an edge model of other shapes or types does not fit this one
                outputs = to_edge(self.cloud, cached.outputs, edge_out) if self.cloud is not None else None
            except CloudFailure:
                outputs = None
            if outputs is not None:
                return Answer(
                    {**edge_out, **outputs},
                    "cache",
                    reason,
                    *_conf(conf),
                    fallback=True,
                    cloud_version=cached.model_version,
                )
        return self._edge(edge_out, conf, reason, fallback=True)

    def _edge(
        self, edge_out: dict[str, np.ndarray], conf: Confidence | None, reason: str, fallback: bool = False
    ) -> Answer:
        return Answer(edge_out, "edge", reason, *_conf(conf), fallback=fallback)

    def _done(self, answer: Answer) -> Answer:
        self.stats.answered(answer.answered_by)
        return answer

    # ------------------------------------------------------------------ audits

    def _maybe_audit(self, inputs: Mapping[str, np.ndarray], edge_out: Mapping[str, np.ndarray]) -> None:
        rate = self.policy.audit_rate
        if rate <= 0 or self._call is None or self._rand() >= rate:
            return
        inputs_copy = {n: np.array(a) for n, a in inputs.items()}
        edge_copy = {n: np.array(a) for n, a in edge_out.items()}
        if not self._audits.submit(self._audit, inputs_copy, edge_copy):
            self.stats.count("audits_dropped")

    def _audit(self, inputs: dict[str, np.ndarray], edge_out: dict[str, np.ndarray]) -> None:
        """Ask the cloud about a confident edge answer, off the caller's path, to measure agreement."""
        if self._call is None:
            return
        try:
            payload = payload_for(self._call.cloud, inputs, edge_out)
        except CloudFailure:
            self.stats.count("audits_failed")
            return
        if self._gate(use_budget=True) is not None:
            self.stats.count("audits_skipped")
            return
        self.stats.count("cloud_calls")
        try:
            outputs, ans = self._call.ask(payload, edge_out, wait=False)
        except CloudFailure as f:
            self._failed(f)
            self.stats.count("audits_failed")
            return
        self.stats.count("audits")
        self._succeeded(edge_out, outputs, ans, self._key(payload))

    # ------------------------------------------------------------------ admin

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait for queued audits and cache writes (tests, shutdown); False on timeout."""
        return self._audits.wait_idle(timeout) and self._writes.wait_idle(timeout)

    def status(self) -> dict[str, Any]:
        """What the local API shows about routing now."""
        return {
            "mode": self.policy.mode.value,
            "cloud_model": self.cloud.model if self.cloud else None,
            "cloud_configured": self.client is not None,
            "cloud_problem": self.cloud_problem,
            "breaker": self.breaker.state.value,
            "budget_tokens": round(self.budget.tokens(), 3),
            "budget_hold_s": round(self.budget.hold_remaining(), 3),
            "cache": self.cache.counters() if self.cache is not None else None,
        }

    def close(self) -> None:
        """Stop background work and close the cloud connection; :meth:`answer` then falls back."""
        self._audits.close()
        self._writes.close()
        if self._call is not None:
            self._call.close()


def _conf(conf: Confidence | None) -> tuple[float | None, bool | None]:
    return (conf.value, conf.confident) if conf is not None else (None, None)
