"""Which variant of a version each selected device would get: the rollout preview.

``GET /api/v1/rollouts/preview`` counts, for a model version and a selector, the devices each
variant goes to (the director's choice, :func:`server.rollouts.desired.count_variants`) and those
no variant fits, without writing anything: what rollout creation checks (``skip_unfit``).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session

from server.catalog.repository import CatalogRepository
from server.errors import Invalid, NotFound
from server.rollouts.desired import count_variants
from server.rollouts.schemas import Selector
from server.rollouts.service import UNFIT_EXAMPLES, select_devices


class VariantPreview(BaseModel):
    model: str
    version: str
    #: devices the selector matches (not decommissioned)
    selected: int
    #: variant name -> devices that would get it (every variant of the version listed)
    variants: dict[str, int]
    #: devices no variant fits (a rollout over them is refused, unless ``skip_unfit`` leaves them out)
    unfit: int
    unfit_examples: list[str] = Field(default_factory=list)


def parse_selector(text: str | None) -> Selector:
    """The ``selector`` query parameter: a rollout's selector as JSON; none: every device."""
    if not text:
        return Selector()
    try:
        return Selector.model_validate(json.loads(text))
    except (ValueError, ValidationError, RecursionError) as exc:  # RecursionError: deep nesting
        first = str(exc).strip().splitlines()[0][:300]
        raise Invalid(f"selector is not a valid selector JSON object: {first}") from None


def preview(session: Session, model: str, version: str, selector: Selector) -> VariantPreview:
    row = CatalogRepository(session).active_version(model, version)
    if row is None:
        raise NotFound(f"no active version {version!r} of model {model!r}")
    devices = select_devices(session, selector)
    artifacts = CatalogRepository(session).published_artifacts(row.id)
    counts, unfit = count_variants(artifacts, devices)
    return VariantPreview(
        model=model, version=version, selected=len(devices), variants=dict(sorted(counts.items())),
        unfit=len(unfit), unfit_examples=unfit[:UNFIT_EXAMPLES],
    )  # fmt: skip
