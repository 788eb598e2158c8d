"""Storing and reading hard examples: :func:`pack`/:func:`unpack` turn tensors into ``.npz`` bytes,
:class:`HardExampleRepository` keeps rows under a byte cap (oldest dropped first) and reads them
back for export or purge."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from server.examples.tables import HardExample

#: before each tensor's name in a blob, so that no name can collide with ``savez``'s own arguments
KEY = "t/"
#: rows looked at per step when dropping the oldest
EVICT_PAGE = 256


def pack(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Tensors by name as ``.npz`` bytes (no pickled objects)."""
    buf = io.BytesIO()
    np.savez(buf, **{KEY + n: np.asarray(a) for n, a in tensors.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {name.removeprefix(KEY): npz[name] for name in npz.files}


class HardExampleRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, example: HardExample) -> None:
        self.session.add(example)
        self.session.flush()

    def evict(self, max_bytes: int, model: str | None = None) -> int:
        """Drop the oldest rows (of ``model``, else of any) until they together fit ``max_bytes``;
        returns how many were dropped."""
        scope = [] if model is None else [HardExample.model == model]
        excess = self.total_bytes(model) - max_bytes
        dropped, after = 0, 0
        while excess > 0:  # oldest first, a page at a time (never every row's id in memory)
            page = self.session.execute(
                sa.select(HardExample.id, HardExample.size_bytes)
                .where(HardExample.id > after, *scope)
                .order_by(HardExample.id)
                .limit(EVICT_PAGE)
            ).all()
            doomed: list[int] = []
            for row_id, size in page:
                if excess <= 0:
                    break
                doomed.append(row_id)
                excess -= size
            if not doomed:
                break
            self.session.execute(sa.delete(HardExample).where(HardExample.id.in_(doomed)))
            dropped += len(doomed)
            after = doomed[-1]
        return dropped

    def select(self, model: str, since: datetime | None, limit: int | None) -> Sequence[HardExample]:
        """The model's examples, oldest first (the newest ``limit`` of them when given)."""
        q = sa.select(HardExample).where(HardExample.model == model)
        if since is not None:
            q = q.where(HardExample.created_at >= since)
        if limit is not None:
            newest = self.session.scalars(q.order_by(HardExample.id.desc()).limit(limit)).all()
            return list(reversed(newest))
        return self.session.scalars(q.order_by(HardExample.id)).all()

    def purge(self, model: str) -> int:
        result = self.session.execute(sa.delete(HardExample).where(HardExample.model == model))
        return int(getattr(result, "rowcount", 0) or 0)

    def total_bytes(self, model: str | None = None) -> int:
        q = sa.select(sa.func.coalesce(sa.func.sum(HardExample.size_bytes), 0))
        if model is not None:
            q = q.where(HardExample.model == model)
        return int(self.session.scalar(q) or 0)
