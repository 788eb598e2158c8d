"""Catalog test helpers: pushing a model through the API, a ``PushUpload`` for the catalog service,
audit rows, and :func:`nothing_published` (no row, no target, no stored file, no leftover upload)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np

from server.catalog.service import PushUpload
from server.catalog.tables import CatalogModel, ModelArtifact, ModelVersion


def push(
    client, headers, name, version, model: Path | bytes, *, variant=None, metadata=None, validation=None
):
    data = {"version": version}
    if variant is not None:
        data["variant"] = variant
    if metadata is not None:
        data["metadata"] = metadata if isinstance(metadata, str) else json.dumps(metadata)
    content = model.read_bytes() if isinstance(model, Path) else model
    files = {"file": ("model.onnx", content, "application/octet-stream")}
    if validation is not None:
        files["validation"] = ("v.npz", validation, "application/octet-stream")
    return client.post(f"/api/v1/models/{name}/versions", data=data, files=files, headers=headers)


def npz_bytes(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    """``arrays`` as the bytes of an ``.npz`` file (a validation or calibration upload)."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def audit_actions(client, headers, action: str) -> list[dict]:
    r = client.get(f"/api/v1/audit?action={action}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def nothing_published(ctx, *, untouched: bool = True) -> None:
    """No catalog rows, no listed target, no stored bundle, no leftover upload; ``untouched``:
    not even a new targets metadata version."""
    with ctx.db.session_scope() as s:
        for table in (CatalogModel, ModelVersion, ModelArtifact):
            assert s.query(table).count() == 0, table
    assert ctx.repo.list_targets() == {}
    if untouched:
        assert ctx.repo.versions()["targets"] == 1
    assert [p for p in ctx.repo.targets_dir.rglob("*") if p.is_file()] == []
    uploads = ctx.settings.data_dir / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


def push_upload(ctx, tmp_path: Path, model: Path, version: str) -> PushUpload:
    work = Path(tempfile.mkdtemp(prefix=f"work-{version}-", dir=tmp_path))
    copy = work / "upload.onnx"
    copy.write_bytes(model.read_bytes())
    return PushUpload(
        version=version,
        variant="default",
        metadata=None,
        model_file=copy,
        validation_file=None,
        work_dir=work,
    )


class Boom(Exception):
    """Raised by a test to make a transaction fail at a chosen point."""
