"""The routing policy and hybrid gates of a rollout being created, checked against the catalog
before anything is written (the pure rules are :mod:`server.rollouts.routing`)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from device_client.protocol.errors import InvalidPayload
from device_client.protocol.routing import CloudSpec, RoutingPolicy, parse_routing_policy
from server.catalog.repository import CatalogRepository
from server.catalog.tables import ModelArtifact, VersionStatus
from server.errors import Invalid
from server.rollouts.routing import MAX_POLICY_BYTES, Signature, gate_problems, policy_problems, policy_size
from server.rollouts.schemas import RolloutCreate


def _label(model: str, version: str, variant: str) -> str:
    return f"{model} {version}" + ("" if variant == "default" else f" (variant {variant})")


class RoutingCheck:
    """A rollout's routing policy and hybrid gates, checked before anything is created: the policy
    parses, fits in a DesiredState, names what the edge model (every published variant of the
    rollout's version) has and, for the fleet endpoint, a cloud model the catalog can serve whose
    signature takes what is sent (:mod:`server.rollouts.routing`). Any problem is one 422."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def check(self, body: RolloutCreate, version_id: int) -> tuple[RoutingPolicy | None, list[str]]:
        """(the policy, warnings); raises :class:`Invalid` naming every problem."""
        policy = None
        if body.routing is not None:
            try:
                policy = parse_routing_policy(body.routing)
            except InvalidPayload as exc:
                raise Invalid(str(exc)) from None
            if (size := policy_size(policy)) > MAX_POLICY_BYTES:
                raise Invalid(
                    f"routing policy of {size} bytes exceeds {MAX_POLICY_BYTES} (it travels in every "
                    "DesiredState, which a device refuses above 64 KiB)"
                )
        problems, warnings = gate_problems(body.gates, policy)
        if policy is not None:
            edge = [
                Signature.of(_label(body.model, body.version, a.variant), a.inputs, a.outputs)
                for a in CatalogRepository(self.session).published_artifacts(version_id)
            ]
            cloud = None
            if policy.cloud is not None and policy.cloud.is_fleet:
                cloud = self.cloud_signature(policy.cloud)
            problems = policy_problems(policy, edge, cloud) + problems
        if problems:
            raise Invalid("routing policy: " + "; ".join(problems))
        return policy, warnings

    def cloud_signature(self, cloud: CloudSpec) -> Signature:
        """The signature of the cloud model the fleet's cloud tier would answer with: the named
        version, or the active one of highest release (of its ``default`` variant, if it has one)."""
        catalog = CatalogRepository(self.session)
        model = catalog.get_model(cloud.model)
        if model is None:
            raise Invalid(f"routing policy: cloud.model {cloud.model!r} is not in the catalog")
        versions = catalog.list_versions(model.id)  # highest release first
        if cloud.version is None:
            chosen = next((v for v in versions if v.status == VersionStatus.active), None)
            if chosen is None:
                raise Invalid(f"routing policy: cloud model {cloud.model!r} has no active version")
        else:
            chosen = next((v for v in versions if v.version == cloud.version), None)
            if chosen is None:
                raise Invalid(f"routing policy: cloud model {cloud.model!r} has no version {cloud.version!r}")
            if chosen.status != VersionStatus.active:
                raise Invalid(
                    f"routing policy: cloud model {cloud.model!r} {cloud.version} is {chosen.status.value}, "
                    "not active"
                )
        published: list[ModelArtifact] = [a for a in chosen.artifacts if a.published]
        if not published:
            raise Invalid(
                f"routing policy: cloud model {cloud.model!r} {chosen.version} has no published bundle"
            )
        art = next((a for a in published if a.variant == "default"), published[0])
        label = "cloud model " + _label(cloud.model, chosen.version, art.variant)
        return Signature.of(label, art.inputs, art.outputs)
