"""Hard-example use cases: :func:`keep` (the cloud tier stores one under the byte cap) and
:class:`ExamplesService` (an admin exports them as one ``.npz`` or purges them; both audited)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from datetime import datetime

import numpy as np
from pydantic import ValidationError
from sqlalchemy.orm import Session

from device_client.protocol.routing import RoutingPolicy
from server.admin.schemas import Principal
from server.admin.service import audit
from server.errors import Invalid
from server.examples.repository import HardExampleRepository, pack, unpack
from server.examples.tables import HardExample

#: most examples one export returns
MAX_EXPORT = 100_000


def collect_cap(routing: object, cloud_model: str, ceiling: int) -> int:
    """How many bytes of ``cloud_model``'s examples a device's signed routing policy (the JSON of
    its DesiredState's ``routing``) lets the cloud keep: 0 unless ``collect`` is on for that model
    on the fleet endpoint; else its ``collect.max_bytes``, at most ``ceiling``."""
    if not isinstance(routing, dict):
        return 0
    try:
        policy = RoutingPolicy.model_validate(routing)
    except ValidationError:
        return 0
    cloud = policy.cloud
    if not policy.collect.enabled or cloud is None or not cloud.is_fleet or cloud.model != cloud_model:
        return 0
    return min(policy.collect.max_bytes, ceiling)


def keep(
    session: Session,
    *,
    model: str,
    version: str,
    device_id: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    model_cap: int,
    max_bytes: int,
) -> bool:
    """Store one escalated request and the cloud's answer, then drop the oldest until the model's
    examples fit ``model_cap`` and all examples ``max_bytes``; False (nothing stored) when it
    alone is larger than either."""
    ins, outs = pack(inputs), pack(outputs)
    size = len(ins) + len(outs)
    if size > min(model_cap, max_bytes):
        return False
    row = HardExample(
        model=model, version=version, device_id=device_id, size_bytes=size, inputs=ins, outputs=outs
    )
    repo = HardExampleRepository(session)
    repo.add(row)
    repo.evict(model_cap, model=model)
    repo.evict(max_bytes)
    return True


def _stack(parts: list[dict[str, np.ndarray]], prefix: str) -> dict[str, np.ndarray]:
    names = sorted({n for p in parts for n in p})
    out: dict[str, np.ndarray] = {}
    for name in names:
        arrays = [p[name] for p in parts if name in p]
        if len(arrays) != len(parts):
            raise Invalid(f"{prefix} {name!r} is missing from some examples: export a narrower --since")
        try:
            out[f"{prefix}/{name}"] = np.concatenate([np.atleast_1d(a) for a in arrays], axis=0)
        except ValueError:
            raise Invalid(
                f"{prefix} {name!r} changed shape between examples (a new model version?): "
                "export a narrower --since"
            ) from None
    return out


def to_npz(rows: list[HardExample]) -> bytes:
    """One ``.npz``: ``inputs/<name>`` and ``outputs/<name>`` concatenated along the batch axis,
    and per example ``rows`` (its batch size), ``device_ids``, ``versions``, ``times`` (ISO 8601)."""
    ins = [unpack(r.inputs) for r in rows]
    outs = [unpack(r.outputs) for r in rows]
    arrays: dict[str, np.ndarray] = {**_stack(ins, "inputs"), **_stack(outs, "outputs")}
    first = [next(iter(i.values())) for i in ins]
    arrays["rows"] = np.array([a.shape[0] if a.ndim else 1 for a in first], dtype=np.int64)
    arrays["device_ids"] = np.array([r.device_id for r in rows], dtype=np.str_)
    arrays["versions"] = np.array([r.version for r in rows], dtype=np.str_)
    arrays["times"] = np.array([r.created_at.isoformat() for r in rows], dtype=np.str_)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # no key is savez's allow_pickle
    return buf.getvalue()


class ExamplesService:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.repo = HardExampleRepository(session)

    def export(
        self, model: str, since: datetime | None, limit: int | None, by: Principal
    ) -> tuple[bytes, int]:
        """The model's examples as ``.npz`` bytes and how many; audited (personal data left)."""
        rows = list(self.repo.select(model, since, min(limit or MAX_EXPORT, MAX_EXPORT)))
        data = to_npz(rows)
        audit(
            self.session, by, "examples.exported", "model", model,
            {"count": len(rows), "since": since.isoformat() if since else None, "bytes": len(data)},
        )  # fmt: skip
        return data, len(rows)

    def purge(self, model: str, by: Principal) -> int:
        deleted = self.repo.purge(model)
        audit(self.session, by, "examples.purged", "model", model, {"deleted": deleted})
        return deleted
