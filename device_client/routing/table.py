"""The routers of the models a device serves (:class:`RoutingTable`): kept in step with the routing
policies of the DesiredStates whose versions serve (``DeviceState.routing``), asked by the local
API for every request of a model that has one, and drained into the health windows. A routed
request is recorded in the model's health window as its caller saw it: the whole time, edge and
cloud, and an error when the edge model failed or gave non-finite outputs."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..protocol.errors import InvalidPayload
from ..protocol.routing import parse_routing_policy
from ..runtime import BadInput, InferenceResult, ModelHost, NoModel
from ..runtime.loader import all_finite
from .factory import RoutingEnvironment, build_router
from .router import Router
from .stats import AnswerPath, RoutingStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routed:
    """One answered request as the local API tells it: the outputs, the edge model version that
    served it, who answered, and (with a policy) the edge confidence, why, and the cloud version."""

    outputs: dict[str, np.ndarray]
    model: str
    version: str
    answered_by: AnswerPath = "edge"
    confidence: float | None = None
    #: None without a routing policy; else ``Answer.reason`` (``confident``, ``escalated``, ...)
    reason: str | None = None
    cloud_version: str | None = None

    @classmethod
    def edge(cls, result: InferenceResult) -> Routed:
        return cls(result.outputs, result.model, result.version)


class _Edge:
    """The edge of one model's router: the host the caller resolved (else the model's host now),
    run without recording, its result kept for the caller's thread."""

    def __init__(self, model: str, hosts: Mapping[str, ModelHost], local: threading.local) -> None:
        self.model = model
        self.hosts = hosts
        self.local = local

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        host = getattr(self.local, "host", None) or self.hosts.get(self.model)
        if host is None:
            raise NoModel(f"no model {self.model!r} is loaded")
        result = host.infer(inputs, record=False)
        self.local.result = result
        return dict(result.outputs)


class RoutingTable:
    """{model: Router}, replaced as a whole by :meth:`sync` (requests read it without a lock)."""

    def __init__(self, env: RoutingEnvironment, hosts: Mapping[str, ModelHost]) -> None:
        self.env = env
        self.hosts = hosts
        self._local = threading.local()
        self._lock = threading.Lock()  # serialises sync and close; requests never take it
        self._routers: dict[str, Router] = {}
        #: the policy (JSON) followed per model, also one that could not be followed
        self._docs: dict[str, dict[str, Any]] = {}
        #: the health-window counters per model: they outlive a replaced router, and a removed
        #: one until they are drained
        self._stats: dict[str, RoutingStats] = {}
        #: why a model's policy could not be followed (its requests are answered by the edge)
        self.problems: dict[str, str] = {}

    def router(self, model: str) -> Router | None:
        return self._routers.get(model)

    def sync(self, policies: Mapping[str, Mapping[str, Any]]) -> None:
        """Follow ``policies`` ({model: policy JSON}): a router for each new or changed policy,
        none for a removed one. An unchanged policy keeps its router (its breaker, budget and
        connections); a replaced router hands its counters to the new one. A policy that cannot
        be followed (it does not parse: a state file from another version) leaves that model
        answered by its edge model, logged and shown in :attr:`problems`."""
        retired: list[Router] = []
        with self._lock:
            routers = dict(self._routers)
            for model in [m for m in self._docs if m not in policies]:
                del self._docs[model]
                self.problems.pop(model, None)
                if model in routers:
                    retired.append(routers.pop(model))
                    log.info("routing for %s: removed; the edge model answers alone", model)
            for model, doc in policies.items():
                if self._docs.get(model) == doc:
                    continue
                self._docs[model] = dict(doc)
                old = routers.pop(model, None)
                if old is not None:
                    retired.append(old)
                try:
                    policy = parse_routing_policy(doc)
                    stats = self._stats.setdefault(model, RoutingStats())
                    edge = _Edge(model, self.hosts, self._local)
                    routers[model] = build_router(policy, self.env, edge, model=model, stats=stats)
                except (InvalidPayload, ValueError, OSError) as exc:
                    self.problems[model] = str(exc)
                    log.error("routing for %s cannot be followed; the edge answers alone: %s", model, exc)
                    continue
                self.problems.pop(model, None)
                cloud = policy.cloud
                log.info(
                    "routing for %s: %s%s",
                    model,
                    policy.mode.value,
                    f" with cloud model {cloud.model} at {cloud.endpoint}" if cloud is not None else "",
                )
            self._routers = routers
        for router in retired:
            router.close()

    def answer(self, host: ModelHost, inputs: Mapping[str, np.ndarray]) -> Routed:
        """Answer one request for ``host``'s model: through its router when it has one, else by
        the host alone. Only an edge failure raises (``BadInput``, ``NoModel``,
        ``InferenceError``), as without routing."""
        router = self._routers.get(host.name)
        if router is None:
            return Routed.edge(host.infer(inputs))
        local = self._local
        local.host, local.result = host, None
        t0 = time.perf_counter_ns()
        try:
            answer = router.answer(inputs)
        except (BadInput, NoModel):  # the caller's input, or nothing serves: not a request served
            raise
        except Exception:
            host.health.record(time.perf_counter_ns() - t0, ok=False)
            raise
        finally:
            local.host = None
        elapsed = time.perf_counter_ns() - t0
        result: InferenceResult = local.result
        local.result = None
        ok = all_finite(list(result.outputs.values())) and (
            answer.answered_by == "edge" or all_finite(list(answer.outputs.values()))
        )  # an edge answer holds exactly the outputs just checked
        host.health.record(elapsed, ok=ok, cpu_ns=result.cpu_ns)
        conf = answer.confidence
        return Routed(
            answer.outputs,
            result.model,
            result.version,
            answer.answered_by,
            conf if conf is not None and math.isfinite(conf) else None,
            answer.reason,
            answer.cloud_version,
        )

    def drain(self, model: str) -> dict[str, Any] | None:
        """``RoutingStats.drain()`` of ``model`` (None if it has had no policy since the last
        drain); a removed policy's counters are drained one last time, then forgotten."""
        with self._lock:
            stats = self._stats.get(model)
            if stats is None:
                return None
            if model not in self._routers:
                del self._stats[model]
        return stats.drain()

    def status(self) -> dict[str, Any]:
        """{model: the router's status, or the problem with its policy}."""
        out: dict[str, Any] = {m: r.status() for m, r in sorted(self._routers.items())}
        for model, problem in self.problems.items():
            out[model] = {"problem": problem}
        return out

    def close(self) -> None:
        """Close every router (at shutdown)."""
        with self._lock:
            routers, self._routers = self._routers, {}
            self._docs.clear()
        for router in routers.values():
            router.close()
