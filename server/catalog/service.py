"""The model registry: push (validate, bundle, sign, publish), list, read and revoke versions.

A push checks names, loads the model in onnxruntime, records its signature, computes validation
outputs, allocates the next release under a row lock and builds the bundle; only then is it
published to the TUF repository, with an ``on_rollback`` hook that un-publishes it, so a push is all
or nothing. Revocation unlists the targets before the commit and deletes their files after it
(step by step: docs/architecture.md, "Model registry").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session
from tuf.api.metadata import TargetFile, Targets

from device_client.protocol.bundle import (
    MODEL_MEMBER,
    VALIDATION_MEMBER,
    build_bundle,
    file_sha256,
)
from server.admin.schemas import Principal
from server.admin.service import audit
from server.catalog.quantize import (
    DEFAULT_MIN_AGREEMENT,
    UPLOADED,
    Calibration,
    VariantMeasurement,
    agreement,
    batched_inputs,
    calibration_rows,
    median_latency_s,
    quantize_int8,
)
from server.catalog.repository import CatalogRepository
from server.catalog.schemas import (
    ArtifactOut,
    ModelOut,
    ModelSummary,
    VersionMetadata,
    VersionOut,
    check_model_name,
    check_variant,
    check_version,
    target_path,
)
from server.catalog.signing import reconcile_published
from server.catalog.tables import CatalogModel, ModelArtifact, ModelVersion, VersionStatus
from server.catalog.validation import (
    LoadedModel,
    generate_inputs,
    load_onnx,
    parse_metadata,
    read_calibration_inputs,
    read_validation_inputs,
    run_validation,
    write_validation,
)
from server.db import after_commit, on_rollback, utcnow
from server.errors import Conflict, Invalid, NotFound

if TYPE_CHECKING:
    from server.context import ServerContext

log = logging.getLogger(__name__)


# -- the service -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PushUpload:
    """A parsed push request: form fields plus the uploaded files, in ``work_dir``."""

    version: str
    variant: str
    metadata: str | None
    model_file: Path
    validation_file: Path | None
    work_dir: Path
    #: ``int8``: also build, measure and publish an int8 variant (server/catalog/quantize.py)
    quantize: str | None = None
    calibration: str = Calibration.dynamic.value
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    #: CPU flags the int8 variant requires of a device, on top of the push's constraints
    int8_cpu_flags: tuple[str, ...] = ()
    #: an uploaded ``.npz`` of calibration inputs for static quantization (else the validation inputs)
    calibration_file: Path | None = None


@dataclass(frozen=True)
class _Build:
    """One variant ready to bundle: its model file, loaded model, validation file, measurements."""

    variant: str
    model_file: Path
    model: LoadedModel
    validation_file: Path
    measurements: dict[str, Any]
    constraints: dict[str, Any]


def version_out(v: ModelVersion) -> VersionOut:
    return VersionOut(
        model=v.model.name,
        version=v.version,
        release=v.release,
        status=v.status,
        created_at=v.created_at,
        created_by=v.created_by,
        revoked_at=v.revoked_at,
        variants=[ArtifactOut.model_validate(a) for a in sorted(v.artifacts, key=lambda a: a.variant)],
    )


class CatalogService:
    def __init__(self, session: Session, ctx: ServerContext) -> None:
        self.session = session
        self.ctx = ctx
        self.catalog = CatalogRepository(session)

    # -- reads -------------------------------------------------------------------------------
    def _model(self, name: str) -> CatalogModel:
        model = self.catalog.get_model(name)
        if model is None:
            raise NotFound(f"no model {name!r}")
        return model

    def _summary(self, m: CatalogModel, count: int, latest: ModelVersion | None) -> ModelSummary:
        return ModelSummary(
            name=m.name,
            created_at=m.created_at,
            last_release=m.last_release,
            version_count=count,
            latest_version=latest.version if latest else None,
            latest_release=latest.release if latest else None,
        )

    def list_models(self) -> list[ModelSummary]:
        counts = self.catalog.version_counts()
        latest = self.catalog.latest_active()
        return [self._summary(m, counts.get(m.id, 0), latest.get(m.id)) for m in self.catalog.list_models()]

    def get_model(self, name: str) -> ModelOut:
        model = self._model(name)
        versions = self.catalog.list_versions(model.id)
        active = [v for v in versions if v.status == VersionStatus.active]
        summary = self._summary(model, len(versions), active[0] if active else None)
        return ModelOut(**summary.model_dump(), versions=[version_out(v) for v in versions])

    def list_versions(self, name: str) -> list[VersionOut]:
        return [version_out(v) for v in self.catalog.list_versions(self._model(name).id)]

    def get_version_row(self, name: str, version: str) -> ModelVersion:
        row = self.catalog.get_version(self._model(name).id, version)
        if row is None:
            raise NotFound(f"model {name!r} has no version {version!r}")
        return row

    def get_version(self, name: str, version: str) -> VersionOut:
        return version_out(self.get_version_row(name, version))

    # -- push --------------------------------------------------------------------------------
    def push(self, name: str, upload: PushUpload, by: Principal) -> VersionOut:
        """Validate, bundle and publish one variant of one version (docs/architecture.md, model registry)."""
        check_model_name(name)
        version = check_version(upload.version)
        variant = check_variant(upload.variant)
        meta = parse_metadata(upload.metadata)

        model = load_onnx(upload.model_file)
        if upload.validation_file is not None:
            limit = self.ctx.settings.max_upload_bytes
            feeds, expected = read_validation_inputs(upload.validation_file, model.inputs, limit)
        else:
            feeds, expected = generate_inputs(model.inputs), {}
        outputs = run_validation(model, feeds, meta.validation, expected)
        validation_file = upload.work_dir / VALIDATION_MEMBER
        write_validation(validation_file, feeds, outputs)

        constraints = meta.constraints.to_dict()
        builds = [_Build(variant, upload.model_file, model, validation_file, {}, constraints)]
        if upload.quantize is not None:
            reference, int8 = self._build_int8(upload, model, feeds, outputs, meta)
            fp32 = _Build(variant, upload.model_file, model, validation_file, reference, constraints)
            builds = [fp32, int8]

        row = self.catalog.get_or_create_model_locked(name)
        existing = self.catalog.get_version(row.id, version)
        if existing is not None and existing.status == VersionStatus.revoked:
            raise Conflict(f"{name} {version} was revoked; push a new version number")
        for build in builds:
            if existing is not None and any(a.variant == build.variant for a in existing.artifacts):
                raise Conflict(f"{name} {version} already has a {build.variant!r} variant")
        if existing is None:
            release = row.last_release + 1
            row.last_release = release
            version_row = ModelVersion(model=row, version=version, release=release, created_by=by.actor)
        else:
            version_row = existing
        for build in builds:
            self._publish(name, version_row, existing is None, build, meta, upload.work_dir, by)
        return version_out(version_row)

    def _build_int8(
        self,
        upload: PushUpload,
        fp32: LoadedModel,
        feeds: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        meta: VersionMetadata,
    ) -> tuple[dict[str, Any], _Build]:
        """Quantize, validate and measure the int8 variant: the fp32 reference measurements and
        the int8 build. :class:`Invalid` (with the numbers) when its agreement with fp32 is below
        ``min_agreement``; nothing is written to the database or the repository here."""
        variant = check_variant("int8" if upload.variant == "default" else f"{upload.variant}-int8")
        build_dir = upload.work_dir / "int8"
        build_dir.mkdir(exist_ok=True)
        model_file = build_dir / "model.onnx"
        calibration = Calibration(upload.calibration)
        calibration_feeds, label = feeds, calibration.value
        static = calibration == Calibration.static
        if upload.calibration_file is not None:
            if not static:
                raise Invalid("uploaded calibration data is for static calibration, not dynamic")
            limit = self.ctx.settings.max_upload_bytes
            calibration_feeds = read_calibration_inputs(upload.calibration_file, fp32.inputs, limit)
            label = UPLOADED
        batched = batched_inputs(fp32.inputs)
        quantize_int8(upload.model_file, model_file, calibration, calibration_feeds, batched=batched)
        int8 = load_onnx(model_file)
        int8_outputs = run_validation(int8, feeds, meta.validation)
        share, metric = agreement(outputs, int8_outputs, meta.validation)
        fp32_s = median_latency_s(fp32.session, feeds)
        int8_s = median_latency_s(int8.session, feeds)
        fp32_size, int8_size = upload.model_file.stat().st_size, model_file.stat().st_size
        measured = VariantMeasurement(
            size_bytes=int8_size,
            size_ratio=int8_size / fp32_size,
            agreement=share,
            agreement_metric=metric,
            latency_ratio=int8_s / fp32_s if fp32_s > 0 else 1.0,
            calibration=label,
            calibration_rows=calibration_rows(calibration_feeds, batched) if static else None,
        )
        if share < upload.min_agreement:
            raise Invalid(
                f"the int8 variant agrees with fp32 on {share:.2%} of the validation inputs "
                f"({metric}), below min_agreement {upload.min_agreement}: size {int8_size} bytes "
                f"({measured.size_ratio:.2f}x fp32), latency {measured.latency_ratio:.2f}x fp32 on "
                f"this server; nothing was published"
            )
        validation_file = build_dir / VALIDATION_MEMBER
        write_validation(validation_file, feeds, int8_outputs)
        reference = VariantMeasurement(
            size_bytes=fp32_size, size_ratio=1.0, agreement=1.0, agreement_metric=metric, latency_ratio=1.0
        )
        constraints = meta.constraints.to_dict()
        if upload.int8_cpu_flags:
            flags = set(constraints.get("cpu_flags", [])) | set(upload.int8_cpu_flags)
            constraints["cpu_flags"] = sorted(flags)
        build = _Build(variant, model_file, int8, validation_file, measured.to_dict(), constraints)
        return reference.to_dict(), build

    def _publish(
        self,
        name: str,
        version_row: ModelVersion,
        new_version: bool,
        build: _Build,
        meta: VersionMetadata,
        work_dir: Path,
        by: Principal,
    ) -> None:
        """Bundle, record and publish (or stage) one variant of ``version_row``."""
        version = version_row.version
        path = target_path(name, version, build.variant)

        bundle = work_dir / f"bundle-{build.variant}.tar"
        build_bundle(
            bundle,
            {
                "name": name,
                "version": version,
                "release": version_row.release,
                "variant": build.variant,
                "inputs": build.model.inputs,
                "outputs": build.model.outputs,
                "preprocessing": meta.preprocessing,
                "validation": meta.validation,
                "created_at": utcnow(),
            },
            {MODEL_MEMBER: build.model_file, VALIDATION_MEMBER: build.validation_file},
        )
        length, sha256 = file_sha256(bundle)
        constraints = build.constraints
        artifact = ModelArtifact(
            version=version_row,
            variant=build.variant,
            target_path=path,
            length=length,
            sha256=sha256,
            inputs=[s.model_dump() for s in build.model.inputs],
            outputs=[s.model_dump() for s in build.model.outputs],
            constraints=constraints,
            measurements=build.measurements,
        )
        self.session.add(version_row)
        self.session.add(artifact)
        try:
            self.session.flush()
        except sa.exc.IntegrityError:
            raise Conflict(f"{name} {version} ({build.variant}) was pushed concurrently") from None
        audit(
            self.session,
            by,
            "model.push",
            "model_version",
            f"{name}@{version}",
            {
                "release": version_row.release,
                "variant": build.variant,
                "target": path,
                "length": length,
                "sha256": sha256,
                "description": meta.description,
            },
        )
        self.session.flush()

        custom = {
            "model": name,
            "version": version,
            "release": version_row.release,
            "variant": build.variant,
            "constraints": constraints,
        }
        repo = self.ctx.repo
        if repo.has_key(Targets.type):
            folds_stage = repo.staged_path.exists()
            # the database rows hold the uniqueness of this path; a listed target here can only be
            # an orphan of a failed compensation, so it is replaced
            info = repo.add_target(path, bundle, custom, replace=True)
            on_rollback(self.session, lambda: self._unpublish(path))
            if folds_stage:  # the key is back: what was staged went out with this publish
                reconcile_published(self.session, repo, purge_revoked=False)
        else:
            # the targets key is offline: stage it for `fleet model sign` (server/catalog/signing.py)
            info, previous = repo.stage_target(path, bundle, custom)
            on_rollback(self.session, lambda: self._unstage(info, previous))
            artifact.published = False
            if new_version:
                version_row.status = VersionStatus.pending
            self.session.flush()
        if info.length != length or info.hashes.get("sha256") != sha256:  # pragma: no cover - paranoia
            raise RuntimeError(f"published {path} does not match the bundle just built")
        log.info(
            "pushed %s %s (%s) as release %d%s",
            name,
            version,
            build.variant,
            version_row.release,
            "" if artifact.published else ", staged for the offline targets signature",
        )

    def _unstage(self, info: TargetFile, previous: TargetFile | None) -> None:
        """Compensation of a staging whose transaction did not commit: the stage as it was, and
        the stored bundle gone unless something still lists it."""
        try:
            self.ctx.repo.unstage(info.path, previous)
            self.ctx.repo.purge_target_file(info)
            log.warning("un-staged %s: its transaction rolled back", info.path)
        except Exception:
            log.exception("could not un-stage %s after a rollback", info.path)

    def _unpublish(self, path: str) -> None:
        """Compensation of a publish whose transaction did not commit."""
        try:
            self.ctx.repo.remove_target(path)
            log.warning("un-published %s: its transaction rolled back", path)
        except Exception:
            log.exception("could not un-publish %s after a rollback; revoke it by hand", path)

    # -- revoke ------------------------------------------------------------------------------
    def revoke(self, name: str, version: str, by: Principal) -> VersionOut:
        """Revoke a version: status ``revoked`` and every target out of the signed metadata."""
        model = self.catalog.get_model_locked(name)  # serialises with pushes of this model
        if model is None:
            raise NotFound(f"no model {name!r}")
        row = self.catalog.get_version(model.id, version)
        if row is None:
            raise NotFound(f"model {name!r} has no version {version!r}")
        if row.status == VersionStatus.revoked:
            return version_out(row)
        row.status = VersionStatus.revoked
        row.revoked_at = utcnow()
        self.session.flush()
        audit(
            self.session,
            by,
            "model.revoke",
            "model_version",
            f"{name}@{version}",
            {"release": row.release, "targets": [a.target_path for a in row.artifacts]},
        )
        self.session.flush()
        repo = self.ctx.repo
        removed: list[TargetFile] = []
        if not repo.has_key(Targets.type):
            # the targets key is offline: the revocation is staged for `fleet model sign`; the
            # version is revoked here at once (no rollout or assignment can name it), its targets
            # stay listed in the signed metadata until the signature, and their files go after it
            unstaged: list[TargetFile] = []
            try:
                for artifact in row.artifacts:
                    info = repo.stage_removal(artifact.target_path)
                    if info is not None:
                        unstaged.append(info)
            finally:
                on_rollback(self.session, lambda: self._restage(unstaged))
                after_commit(self.session, lambda: self._purge(unstaged))  # files listed nowhere
            return version_out(row)
        folds_stage = repo.staged_path.exists()
        try:
            for artifact in row.artifacts:
                info = repo.remove_target(artifact.target_path, delete_file=False)
                if info is not None:
                    removed.append(info)
        finally:
            # registered even if a removal failed half-way, so the ones done are restored
            on_rollback(self.session, lambda: self._restore(removed))
            after_commit(self.session, lambda: self._purge(removed))
        if folds_stage and removed:  # the key is back: what was staged went out with this publish
            reconcile_published(self.session, repo, purge_revoked=False)
        return version_out(row)

    def _restage(self, unstaged: list[TargetFile]) -> None:
        for info in unstaged:
            try:
                self.ctx.repo.unstage(info.path, info)
            except Exception:
                log.exception("could not re-stage %s after a failed revocation", info.path)

    def _restore(self, removed: list[TargetFile]) -> None:
        for info in removed:
            try:
                self.ctx.repo.restore_target(info)
                log.warning("re-listed %s: its revocation rolled back", info.path)
            except Exception:
                log.exception("could not re-list %s after a failed revocation", info.path)

    def _purge(self, removed: list[TargetFile]) -> None:
        for info in removed:
            try:
                self.ctx.repo.purge_target_file(info)
            except Exception:
                log.exception("could not delete the file of revoked target %s", info.path)
