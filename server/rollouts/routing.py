"""A rollout's routing policy against the catalog (pure, docs/architecture.md "Hybrid routing"):
what it names must exist in the edge model's signature (the rollout's version) and, for the fleet
endpoint, fit the cloud model's. The service looks the signatures up and turns problems into 422s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_client.protocol.bundle import TensorSpec
from device_client.protocol.routing import SEND_INPUT, RoutingMode, RoutingPolicy
from server.rollouts.policy import Gates
from server.rollouts.tables import Deployment, Rollout

#: a policy travels inside every DesiredState, which a device refuses above 64 KiB
MAX_POLICY_BYTES = 32 * 1024
#: numpy dtype kinds a cloud output may come in for an edge output of the same kind (the device
#: converts within a kind: device_client/routing/call.py)
_KINDS = ("f", "iu", "b")


@dataclass(frozen=True)
class Signature:
    """The inputs and outputs of one bundle (a variant of a version), as the catalog records them."""

    label: str  # e.g. "det 2.0.0 (default)", for messages
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]

    @classmethod
    def of(
        cls, label: str, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]
    ) -> Signature:
        """From an artifact's ``inputs`` and ``outputs`` columns."""
        ins = [TensorSpec.model_validate(s) for s in inputs]
        outs = [TensorSpec.model_validate(s) for s in outputs]
        return cls(label, {s.name: s for s in ins}, {s.name: s for s in outs})


def asks_cloud(policy: RoutingPolicy | None) -> bool:
    return policy is not None and policy.mode is not RoutingMode.edge_only and policy.cloud is not None


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join("?" if not isinstance(d, int) else str(d) for d in spec.shape) + "]"


def shapes_fit(a: TensorSpec, b: TensorSpec) -> bool:
    """Same rank, and every dimension known on both sides equal (a dynamic one fits any)."""
    if len(a.shape) != len(b.shape):
        return False
    pairs = zip(a.shape, b.shape, strict=True)
    return all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in pairs)


def _same_kind(a: str, b: str) -> bool:
    try:
        ka, kb = np.dtype(a).kind, np.dtype(b).kind
    except TypeError:
        return a == b
    return any(ka in kind and kb in kind for kind in _KINDS)


def policy_problems(policy: RoutingPolicy, edge: Sequence[Signature], cloud: Signature | None) -> list[str]:
    """Why ``policy`` cannot work with the edge model (every variant in ``edge``) and the cloud
    model (``cloud``: its signature, for the fleet endpoint; None for an external one, which the
    server cannot see); empty when it can."""
    problems: list[str] = []
    for sig in edge:
        mine = _edge_problems(policy, sig)
        if cloud is not None and policy.cloud is not None and not mine:
            mine = _fit_cloud(policy, sig, cloud)
        problems += [p for p in mine if p not in problems]
    return problems


def _edge_problems(policy: RoutingPolicy, sig: Signature) -> list[str]:
    """Names the policy takes from the edge model that its signature lacks."""
    problems: list[str] = []
    named = policy.confidence.output if policy.confidence is not None else None
    if named is not None and named not in sig.outputs:
        problems.append(
            f"confidence.output {named!r} is not an output of {sig.label} "
            f"(its outputs: {', '.join(sig.outputs)})"
        )
    spec = policy.cloud
    if spec is None:
        return problems
    if spec.send != SEND_INPUT and spec.send not in sig.outputs:
        problems.append(
            f"cloud.send {spec.send!r} is not an output of {sig.label} "
            f"(its outputs: {', '.join(sig.outputs)})"
        )
    for name in spec.outputs:
        if name not in sig.outputs:
            problems.append(f"cloud.outputs names {name!r}, which is not an output of {sig.label}")
    return problems


def _fit_cloud(policy: RoutingPolicy, edge: Signature, cloud: Signature) -> list[str]:
    """What the edge sends against the cloud model's inputs, what it answers against the edge's
    outputs it stands in for."""
    spec = policy.cloud
    assert spec is not None
    problems: list[str] = []
    sent = dict(edge.inputs) if spec.send == SEND_INPUT else {spec.send: edge.outputs[spec.send]}
    what = "the edge model's input" if spec.send == SEND_INPUT else "the edge output"
    for name in spec.inputs:
        if name not in sent:
            problems.append(f"cloud.inputs renames {name!r}, which is not sent (send: {spec.send!r})")
    given = set()
    for name, tensor in sent.items():
        target = spec.inputs.get(name, name)
        given.add(target)
        theirs = cloud.inputs.get(target)
        if theirs is None:
            problems.append(
                f"{what} {name!r} goes to input {target!r}, which {cloud.label} does not have "
                f"(its inputs: {', '.join(cloud.inputs)}); rename it in cloud.inputs"
            )
        elif tensor.dtype != theirs.dtype or not shapes_fit(tensor, theirs):
            problems.append(
                f"{what} {name!r} is {tensor.dtype}{_shape(tensor)}, but input {target!r} of {cloud.label} "
                f"takes {theirs.dtype}{_shape(theirs)}"
            )
    for name in cloud.inputs:
        if name not in given:
            problems.append(f"input {name!r} of {cloud.label} would get nothing from the device")
    mapping = dict(spec.outputs) or {n: n for n in edge.outputs}
    for mine, theirs_name in mapping.items():
        ours, theirs = edge.outputs[mine], cloud.outputs.get(theirs_name)
        if theirs is None:
            problems.append(
                f"{cloud.label} has no output {theirs_name!r} to stand in for the edge output {mine!r} "
                f"(its outputs: {', '.join(cloud.outputs)}); map them in cloud.outputs"
            )
        elif not _same_kind(ours.dtype, theirs.dtype) or not shapes_fit(ours, theirs):
            problems.append(
                f"output {theirs_name!r} of {cloud.label} is {theirs.dtype}{_shape(theirs)}, but the edge "
                f"output {mine!r} it stands in for is {ours.dtype}{_shape(ours)}"
            )
    return problems


def gate_problems(gates: Gates, policy: RoutingPolicy | None) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the hybrid gates for a rollout carrying ``policy``: a cloud
    agreement nobody can report would hold every stage until it pauses; escalation gates without a
    policy that asks the cloud have nothing to judge."""
    problems: list[str] = []
    warnings: list[str] = []
    if gates.min_cloud_agreement is not None and not asks_cloud(policy):
        problems.append(
            "min_cloud_agreement needs a routing policy that asks the cloud (mode prefer_edge, "
            "prefer_cloud or cloud_only): without one no device reports a cloud agreement"
        )
    escalation = [g for g in ("max_escalation_rate", "max_escalation_ratio") if getattr(gates, g) is not None]
    if escalation and not asks_cloud(policy):
        why = "carries no routing policy" if policy is None else "has a policy that never asks the cloud"
        warnings.append(
            f"{' and '.join(escalation)} will not be judged: the rollout {why}, "
            "so its devices report no escalations"
        )
    return problems, warnings


def policy_key(policy: Mapping[str, Any]) -> str:
    """A short stable key of a policy (its canonical JSON), to store each distinct policy once."""
    canonical = json.dumps(policy, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def policy_size(policy: RoutingPolicy) -> int:
    return len(json.dumps(policy.to_dict(), separators=(",", ":")).encode())


class PreviousRouting:
    """The routing policy a rollback restores on each device: the one it held when the rollout was
    created (``details["previous_routing"]``), or none."""

    def __init__(self, rollout: Rollout) -> None:
        self.stored = rollout.previous_routing or {}
        self._parsed: dict[str, RoutingPolicy] = {}

    def of(self, dep: Deployment) -> RoutingPolicy | None:
        key = (dep.details or {}).get("previous_routing")
        if key is None or key not in self.stored:
            return None
        if key not in self._parsed:
            self._parsed[key] = RoutingPolicy.model_validate(self.stored[key])
        return self._parsed[key]

