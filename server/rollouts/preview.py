"""Which variant of a version each selected device would get: the rollout preview.

``GET /api/v1/rollouts/preview`` counts, for a model version and a selector, the devices each
variant goes to (the director's choice, :func:`server.rollouts.desired.pick_artifact`) and those
no variant fits, without writing anything.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session

from server.catalog.repository import CatalogRepository
from server.catalog.tables import ModelArtifact
from server.devices.tables import DeviceStatus
from server.errors import Invalid, NotFound
from server.rollouts.desired import DeviceTarget, pick_artifact
from server.rollouts.schemas import Selector
from server.rollouts.service import select_devices

#: device ids listed as examples of those no variant fits
UNFIT_EXAMPLES = 20


class VariantPreview(BaseModel):
    model: str
    version: str
    #: devices the selector matches (not decommissioned)
    selected: int
    #: variant name -> devices that would get it (every variant of the version listed)
    variants: dict[str, int]
    #: devices no variant fits (a rollout would fail on them)
    unfit: int
    unfit_examples: list[str] = Field(default_factory=list)


def count_variants(
    artifacts: Sequence[ModelArtifact], devices: Iterable[tuple[str, dict[str, Any]]]
) -> tuple[Counter[str], list[str]]:
    """Devices per variant picked, and the ids of the devices no variant fits."""
    counts: Counter[str] = Counter({a.variant: 0 for a in artifacts})
    unfit: list[str] = []
    for device_id, hardware in devices:
        target = DeviceTarget(
            id=device_id, status=DeviceStatus.online, arch=str(hardware.get("arch", "")),
            hardware=hardware, desired_seq=0,
        )  # fmt: skip
        try:
            counts[pick_artifact(list(artifacts), target, None).variant] += 1
        except Invalid:
            unfit.append(device_id)
    return counts, unfit


def parse_selector(text: str | None) -> Selector:
    """The ``selector`` query parameter: a rollout's selector as JSON; none: every device."""
    if not text:
        return Selector()
    try:
        return Selector.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise Invalid(f"selector is not a valid selector JSON object: {first}") from None


def preview(session: Session, model: str, version: str, selector: Selector) -> VariantPreview:
    row = CatalogRepository(session).active_version(model, version)
    if row is None:
        raise NotFound(f"no active version {version!r} of model {model!r}")
    devices = select_devices(session, selector)
    counts, unfit = count_variants(row.artifacts, ((d.id, d.hardware or {}) for d in devices))
    return VariantPreview(
        model=model, version=version, selected=len(devices), variants=dict(sorted(counts.items())),
        unfit=len(unfit), unfit_examples=unfit[:UNFIT_EXAMPLES],
    )  # fmt: skip
