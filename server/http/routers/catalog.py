"""Model registry API: push, list, read and revoke model versions.

``POST /api/v1/models/{name}/versions`` (operator) takes ``multipart/form-data`` with

* ``file``: the ONNX model (required);
* ``version``: a semantic version (required); ``variant``: hardware variant (default ``default``);
* ``metadata``: optional JSON {preprocessing, validation: {rtol, atol, compare},
  constraints: {arch, min_ram_mb, providers, cpu_flags}, description};
* ``validation``: optional ``.npz`` of validation inputs (keys ``inputs/<name>``);
* ``quantize=int8`` (with optional ``calibration``, ``min_agreement``, ``int8_cpu_flags``): also
  build, measure and publish an int8 variant (server/catalog/quantize.py);
* ``calibration_data``: optional ``.npz`` of calibration inputs (keys ``inputs/<name>``) for a
  static int8 calibration (implies ``calibration=static``; the measurement still uses the
  validation inputs).

The body is streamed straight into files in a private temporary directory, never held in memory.
The whole request body may not exceed ``Settings.max_upload_bytes``: a larger ``Content-Length`` is
refused before a byte is read, and a body that turns out larger while streaming (chunked, or a
lying header) is cut off, both with 413. Authentication runs before the body is read, so an
unauthenticated client cannot make the server store anything.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.catalog.accuracy import FieldAccuracyService
from server.catalog.quantize import Calibration
from server.catalog.schemas import ModelOut, ModelSummary, VersionOut, check_model_name
from server.catalog.service import CatalogService, PushUpload
from server.errors import Invalid, PayloadTooLarge
from server.health.schemas import FieldAccuracyOut
from server.http.deps import Admin, Operator, SessionDep, Viewer, get_ctx

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

router = APIRouter(prefix="/api/v1", tags=["models"])

FILE_FIELDS = {
    "file": "upload.onnx",
    "validation": "validation-upload.npz",
    "calibration_data": "calibration-upload.npz",
}
TEXT_FIELDS = ("version", "variant", "metadata", "quantize", "calibration", "min_agreement", "int8_cpu_flags")
MAX_TEXT_FIELD_BYTES = 64 * 1024
#: hand parsed data to a worker thread in batches of this size (file writes off the event loop)
_BATCH_BYTES = 1024 * 1024


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    sink: IO[bytes] | None = None
    text: bytearray = field(default_factory=bytearray)


class _FormReceiver:
    """Streams a ``multipart/form-data`` body: file fields into files in ``work_dir``, small text
    fields into memory; unknown or repeated fields are refused."""

    def __init__(self, boundary: bytes, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.fields: dict[str, str] = {}
        self.files: dict[str, Path] = {}
        self.finished = False
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def write(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise Invalid(f"malformed multipart body: {exc}") from None

    def finish(self) -> None:
        self._parser.finalize()
        if not self.finished:
            raise Invalid("truncated multipart body")

    def close(self) -> None:
        if self._part.sink is not None:
            self._part.sink.close()

    def _on_part_begin(self) -> None:
        self._part = _Part()
        self._headers = {}

    def _on_header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").strip().lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition"))
        if disposition != b"form-data" or b"name" not in params:
            raise Invalid("every multipart part needs Content-Disposition: form-data; name=...")
        name = params[b"name"].decode("utf-8", "replace")
        if name in self.fields or name in self.files:
            raise Invalid(f"form field {name!r} given twice")
        if name in FILE_FIELDS:
            path = self.work_dir / FILE_FIELDS[name]
            self._part = _Part(name=name, sink=open(path, "xb"))  # noqa: SIM115 - closed in _on_part_end
            self.files[name] = path
        elif name in TEXT_FIELDS:
            self._part = _Part(name=name)
        else:
            raise Invalid(
                f"unexpected form field {name!r}; expected {', '.join([*FILE_FIELDS, *TEXT_FIELDS])}"
            )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.sink is not None:
            part.sink.write(data[start:end])
            return
        part.text.extend(data[start:end])
        if len(part.text) > MAX_TEXT_FIELD_BYTES:
            raise Invalid(f"form field {part.name!r} is longer than {MAX_TEXT_FIELD_BYTES} bytes")

    def _on_part_end(self) -> None:
        part = self._part
        if part.sink is not None:
            part.sink.close()
            part.sink = None
        else:
            try:
                self.fields[part.name] = part.text.decode("utf-8")
            except UnicodeDecodeError:
                raise Invalid(f"form field {part.name!r} is not UTF-8") from None

    def _on_end(self) -> None:
        self.finished = True


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"upload exceeds the limit of {limit} bytes (max_upload_bytes)")


async def _receive_push(request: Request, name: str) -> AsyncIterator[PushUpload]:
    """Dependency: stream the push form into a temporary directory (removed after the request)."""
    check_model_name(name)  # refuse before reading a large body for nothing
    settings = get_ctx(request).settings
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise Invalid("expected a multipart/form-data body")
    tmp_root = settings.data_dir / "uploads"
    await asyncio.to_thread(tmp_root.mkdir, parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="push-", dir=tmp_root))
    receiver = _FormReceiver(params[b"boundary"], work_dir)
    try:
        total = 0
        batch: list[bytes] = []
        batched = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            batch.append(chunk)
            batched += len(chunk)
            if batched >= _BATCH_BYTES:
                await asyncio.to_thread(receiver.write, b"".join(batch))
                batch, batched = [], 0
        if batch:
            await asyncio.to_thread(receiver.write, b"".join(batch))
        receiver.finish()
        if "file" not in receiver.files:
            raise Invalid("the form lacks the model file (field 'file')")
        if not receiver.fields.get("version"):
            raise Invalid("the form lacks 'version'")
        upload = PushUpload(
            version=receiver.fields["version"].strip(),
            variant=(receiver.fields.get("variant") or "default").strip(),
            metadata=receiver.fields.get("metadata") or None,
            model_file=receiver.files["file"],
            validation_file=receiver.files.get("validation"),
            work_dir=work_dir,
            calibration_file=receiver.files.get("calibration_data"),
            **_quantize_fields(receiver.fields, "calibration_data" in receiver.files),
        )
        yield upload
    finally:
        receiver.close()
        await asyncio.to_thread(shutil.rmtree, work_dir, True)


CPU_FLAG_RE = re.compile(r"[a-z0-9_]{1,32}", re.ASCII)


def _quantize_fields(fields: dict[str, str], calibration_data: bool = False) -> dict[str, Any]:
    """The optional ``quantize``, ``calibration``, ``min_agreement`` and ``int8_cpu_flags`` form
    fields, checked; ``calibration_data`` (an uploaded calibration set) implies static."""
    out: dict[str, Any] = {}
    quantize = (fields.get("quantize") or "").strip()
    if quantize:
        if quantize != "int8":
            raise Invalid(f"quantize must be 'int8', not {quantize!r}")
        out["quantize"] = quantize
    calibration = (fields.get("calibration") or "").strip()
    if calibration:
        if calibration not in {c.value for c in Calibration}:
            raise Invalid(f"calibration must be 'dynamic' or 'static', not {calibration!r}")
        out["calibration"] = calibration
    raw = (fields.get("min_agreement") or "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise Invalid(f"min_agreement is not a number: {raw!r}") from None
        if not 0.0 <= value <= 1.0:
            raise Invalid(f"min_agreement must be within [0, 1], not {value}")
        out["min_agreement"] = value
    flags = [f.strip() for f in (fields.get("int8_cpu_flags") or "").split(",") if f.strip()]
    for flag in flags:
        if not CPU_FLAG_RE.fullmatch(flag):
            raise Invalid(f"invalid CPU flag {flag!r}: lowercase letters, digits, '_'; 1-32 characters")
    if len(flags) > 16:
        raise Invalid("at most 16 int8_cpu_flags")
    if flags:
        out["int8_cpu_flags"] = tuple(flags)
    if (calibration or raw or flags or calibration_data) and not quantize:
        raise Invalid(
            "calibration, calibration_data, min_agreement and int8_cpu_flags apply only with quantize=int8"
        )
    if calibration_data:
        if calibration == Calibration.dynamic:
            raise Invalid("calibration_data calibrates a static quantization: not with calibration=dynamic")
        out["calibration"] = Calibration.static.value
    return out


def _service(request: Request, session: Session) -> CatalogService:
    return CatalogService(session, get_ctx(request))


@router.post("/models/{name}/versions", status_code=201)
def push_version(
    name: str,
    request: Request,
    session: Session = SessionDep,
    who: Principal = Operator,
    upload: PushUpload = Depends(_receive_push),
) -> VersionOut:
    """Upload an ONNX model as a new version (or a new variant of a version): it is validated with
    onnxruntime, bundled with validation vectors, signed into the TUF repository and recorded."""
    return _service(request, session).push(name, upload, who)


@router.get("/models")
def list_models(request: Request, session: Session = SessionDep, _: Principal = Viewer) -> list[ModelSummary]:
    return _service(request, session).list_models()


@router.get("/models/{name}")
def get_model(name: str, request: Request, session: Session = SessionDep, _: Principal = Viewer) -> ModelOut:
    return _service(request, session).get_model(name)


@router.get("/models/{name}/versions")
def list_versions(
    name: str, request: Request, session: Session = SessionDep, _: Principal = Viewer
) -> list[VersionOut]:
    return _service(request, session).list_versions(name)


@router.get("/models/{name}/versions/{version}")
def get_version(
    name: str, version: str, request: Request, session: Session = SessionDep, _: Principal = Viewer
) -> VersionOut:
    return _service(request, session).get_version(name, version)


@router.delete("/models/{name}/versions/{version}")
def revoke_version(
    name: str, version: str, request: Request, session: Session = SessionDep, who: Principal = Admin
) -> VersionOut:
    """Revoke a version: it is marked revoked and its bundles leave the signed repository."""
    return _service(request, session).revoke(name, version, who)


@router.get("/models/{name}/field-accuracy")
def field_accuracy(
    name: str,
    request: Request,
    since: datetime | None = Query(default=None, description="start (ISO 8601; default: 24 hours ago)"),
    bucket_s: int = Query(default=3600, ge=60, le=7 * 86400, description="bucket length in seconds"),
    session: Session = SessionDep,
    _: Principal = Viewer,
) -> FieldAccuracyOut:
    """The model's field accuracy per version over time, from its devices' serve health windows:
    requests, who answered them (edge, cloud, cache), the escalation rate, and how often the edge
    answer matched the cloud's (weighted by the answers compared)."""
    return FieldAccuracyService(session).field_accuracy(name, since, bucket_s)
