"""The model registry through the API: real ONNX files, real onnxruntime, real TUF repository."""

from __future__ import annotations

import numpy as np
import pytest

from device_client.protocol.bundle import extract_bundle
from server.admin.service import CLI_PRINCIPAL
from server.catalog.service import CatalogService, PushUpload
from server.catalog.tables import CatalogModel
from tests.helpers.catalog import Boom, audit_actions, auth, nothing_published, npz_bytes, push, push_upload
from tests.helpers.onnx_models import reference_output


@pytest.fixture
def operator_headers(make_token):
    return auth(make_token("operator"))


def test_push_two_versions_and_read_them_back(
    app_client, admin_headers, operator_headers, ctx, onnx_model, tmp_path
):
    v1 = onnx_model("v1.onnx", seed=1)
    v2 = onnx_model("v2.onnx", seed=2, scale=2.0)
    meta = {
        "preprocessing": {"normalize": "imagenet"},
        "validation": {"rtol": 1e-4, "atol": 1e-5, "compare": "allclose"},
        "constraints": {"arch": "x86_64", "min_ram_mb": 512},
        "description": "first cut",
    }
    r1 = push(app_client, operator_headers, "resnet", "1.0.0", v1, metadata=meta)
    assert r1.status_code == 201, r1.text
    r2 = push(app_client, operator_headers, "resnet", "1.1.0", v2)
    assert r2.status_code == 201, r2.text
    one, two = r1.json(), r2.json()
    assert (one["release"], two["release"]) == (1, 2)
    art = one["variants"][0]
    assert art["variant"] == "default"
    assert art["target_path"] == "resnet/1.0.0/default/bundle.tar"
    assert art["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 4]}]
    assert art["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["N", 3]}]
    assert art["constraints"] == {"arch": ["x86_64"], "min_ram_mb": 512}

    # the signed repository lists both, with the custom fields of docs/architecture.md
    listed = ctx.repo.list_targets()
    assert sorted(listed) == ["resnet/1.0.0/default/bundle.tar", "resnet/1.1.0/default/bundle.tar"]
    t1 = listed["resnet/1.0.0/default/bundle.tar"]
    assert (t1.length, t1.hashes["sha256"]) == (art["length"], art["sha256"])
    assert t1.custom == {
        "model": "resnet",
        "version": "1.0.0",
        "release": 1,
        "variant": "default",
        "constraints": {"arch": ["x86_64"], "min_ram_mb": 512},
    }

    # the stored bundle is what the device will extract: manifest, model, validation vectors
    out = tmp_path / "x1"
    manifest = extract_bundle(ctx.repo.target_file("resnet/1.0.0/default/bundle.tar"), out)
    assert (manifest.name, manifest.version, manifest.release, manifest.variant) == (
        "resnet",
        "1.0.0",
        1,
        "default",
    )
    assert manifest.preprocessing == {"normalize": "imagenet"}
    assert (manifest.validation.rtol, manifest.validation.atol) == (1e-4, 1e-5)
    assert (out / "model.onnx").read_bytes() == v1.read_bytes()
    with np.load(out / "validation.npz") as vz:
        assert sorted(vz.files) == ["inputs/x", "outputs/y"]
        x = vz["inputs/x"]
        assert x.dtype == np.float32
        assert x.shape == (1, 4)
        assert ((x >= 0) & (x < 1)).all()
        np.testing.assert_allclose(vz["outputs/y"], reference_output(x, seed=1), rtol=1e-5)

    models = app_client.get("/api/v1/models", headers=operator_headers).json()
    assert [(m["name"], m["latest_version"], m["last_release"], m["version_count"]) for m in models] == [
        ("resnet", "1.1.0", 2, 2)
    ]
    detail = app_client.get("/api/v1/models/resnet", headers=operator_headers).json()
    assert [v["version"] for v in detail["versions"]] == ["1.1.0", "1.0.0"]
    versions = app_client.get("/api/v1/models/resnet/versions", headers=operator_headers).json()
    assert [(v["version"], v["release"], v["status"]) for v in versions] == [
        ("1.1.0", 2, "active"),
        ("1.0.0", 1, "active"),
    ]
    one_again = app_client.get("/api/v1/models/resnet/versions/1.0.0", headers=operator_headers).json()
    assert one_again["variants"][0]["sha256"] == art["sha256"]
    assert app_client.get("/api/v1/models/resnet/versions/9.9.9", headers=operator_headers).status_code == 404
    assert app_client.get("/api/v1/models/nope", headers=operator_headers).status_code == 404

    pushes = audit_actions(app_client, admin_headers, "model.push")
    assert sorted(a["target_id"] for a in pushes) == ["resnet@1.0.0", "resnet@1.1.0"]
    first = next(a for a in pushes if a["target_id"] == "resnet@1.0.0")
    assert first["details"]["description"] == "first cut"
    assert first["details"]["sha256"] == art["sha256"]


def test_new_variant_reuses_the_version_release(app_client, operator_headers, ctx, onnx_model):
    m = onnx_model()
    assert push(app_client, operator_headers, "det", "1.0.0", m).json()["release"] == 1
    r = push(
        app_client,
        operator_headers,
        "det",
        "1.0.0",
        onnx_model("arm.onnx", seed=3),
        variant="arm64-int8",
        metadata={"constraints": {"arch": ["aarch64"], "providers": ["CPUExecutionProvider"]}},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["release"] == 1
    assert [a["variant"] for a in body["variants"]] == ["arm64-int8", "default"]
    assert ctx.repo.get_target("det/1.0.0/arm64-int8/bundle.tar").custom["release"] == 1
    assert push(app_client, operator_headers, "det", "1.0.1", m).json()["release"] == 2


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_not_an_onnx_model_is_422_and_nothing_is_written(app_client, operator_headers, ctx, onnx_model, kind):
    real = onnx_model(slow_factor=2).read_bytes()
    content = {
        "garbage": b"\x00not an onnx model at all\xff" * 100,
        "truncated": real[: len(real) // 2],
        "empty": b"",
    }[kind]
    r = push(app_client, operator_headers, "resnet", "1.0.0", content)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid"
    assert "not a loadable ONNX model" in r.json()["detail"]
    nothing_published(ctx)


def test_duplicate_version_is_409_and_changes_nothing(app_client, operator_headers, ctx, onnx_model):
    m = onnx_model()
    assert push(app_client, operator_headers, "resnet", "1.0.0", m).status_code == 201
    before = ctx.repo.versions()
    r = push(app_client, operator_headers, "resnet", "1.0.0", onnx_model("other.onnx", seed=9))
    assert r.status_code == 409
    assert r.json() == {"detail": "resnet 1.0.0 already has a 'default' variant", "code": "conflict"}
    assert ctx.repo.versions() == before
    models = app_client.get("/api/v1/models", headers=operator_headers).json()
    assert models[0]["last_release"] == 1


@pytest.mark.parametrize(
    ("name", "version", "variant", "metadata", "message"),
    [
        ("resnet", "1.0", None, None, "invalid version '1.0'"),
        ("resnet", "v1.0.0", None, None, "invalid version"),
        ("resnet", "01.0.0", None, None, "invalid version"),
        ("ResNet", "1.0.0", None, None, "invalid model name"),
        ("resnet", "1.0.0", "Big_Variant", None, "invalid variant"),
        ("resnet", "1.0.0", None, "{not json", "metadata is not JSON"),
        ("resnet", "1.0.0", None, {"validation": {"rtol": -1}}, "invalid metadata: validation.rtol"),
        ("resnet", "1.0.0", None, {"surprise": 1}, "invalid metadata: surprise"),
    ],
)
def test_invalid_names_and_metadata_are_422(
    app_client, operator_headers, ctx, onnx_model, name, version, variant, metadata, message
):
    r = push(app_client, operator_headers, name, version, onnx_model(), variant=variant, metadata=metadata)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    nothing_published(ctx)


def test_semver_prerelease_and_build_metadata_are_accepted(app_client, operator_headers, ctx, onnx_model):
    r = push(app_client, operator_headers, "resnet", "2.0.0-rc.1+build.7", onnx_model())
    assert r.status_code == 201, r.text
    path = "resnet/2.0.0-rc.1+build.7/default/bundle.tar"
    assert r.json()["variants"][0]["target_path"] == path
    assert ctx.repo.target_file(path).is_file()


def test_oversized_upload_is_413(app_client, operator_headers, ctx, onnx_model):
    limit = ctx.settings.max_upload_bytes
    big = b"\x01" * (limit + 1)
    r = push(app_client, operator_headers, "resnet", "1.0.0", big)  # Content-Length is known: early refusal
    assert r.status_code == 413
    assert r.json()["code"] == "too_large"
    assert str(limit) in r.json()["detail"]

    # chunked body without Content-Length: cut off while streaming
    boundary = "fleetboundary"

    def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n1.0.0\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(limit // (256 * 1024) + 2):
            yield b"\x02" * (256 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = app_client.post(
        "/api/v1/models/resnet/versions",
        content=body(),
        headers={**operator_headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413
    nothing_published(ctx)


def test_malformed_forms_are_422(app_client, operator_headers, ctx, onnx_model):
    url = "/api/v1/models/resnet/versions"
    r = app_client.post(url, json={"version": "1.0.0"}, headers=operator_headers)
    assert (r.status_code, r.json()["detail"]) == (422, "expected a multipart/form-data body")
    r = app_client.post(
        url, data={"version": "1.0.0"}, files={"other": ("x", b"x")}, headers=operator_headers
    )
    assert r.status_code == 422
    assert "unexpected form field 'other'" in r.json()["detail"]
    r = app_client.post(url, data={"version": "1.0.0", "variant": "x"}, headers={**operator_headers})
    assert r.status_code == 422
    r = app_client.post(url, files={"file": ("m.onnx", onnx_model().read_bytes())}, headers=operator_headers)
    assert (r.status_code, r.json()["detail"]) == (422, "the form lacks 'version'")
    nothing_published(ctx)


def test_roles_and_authentication(app_client, make_token, ctx, onnx_model):
    m = onnx_model()
    viewer = auth(make_token("viewer"))
    r = push(app_client, viewer, "resnet", "1.0.0", m)
    assert r.status_code == 403
    r = push(app_client, {}, "resnet", "1.0.0", m)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = push(app_client, auth("fa.nothere.AAAAAAAAAAAAAAAAAAAAAAAA"), "resnet", "1.0.0", m)
    assert r.status_code == 401
    assert app_client.get("/api/v1/models").status_code == 401
    assert app_client.get("/api/v1/models", headers=viewer).json() == []
    nothing_published(ctx)


def test_revoke_removes_targets_and_is_admin_only(
    app_client, admin_headers, operator_headers, ctx, onnx_model
):
    push(app_client, operator_headers, "resnet", "1.0.0", onnx_model())
    push(app_client, operator_headers, "resnet", "1.0.0", onnx_model("b.onnx", seed=4), variant="gpu")
    push(app_client, operator_headers, "resnet", "1.1.0", onnx_model("c.onnx", seed=5))
    paths = ["resnet/1.0.0/default/bundle.tar", "resnet/1.0.0/gpu/bundle.tar"]
    files = [ctx.repo.target_file(p) for p in paths]

    assert (
        app_client.delete("/api/v1/models/resnet/versions/1.0.0", headers=operator_headers).status_code == 403
    )
    assert all(ctx.repo.get_target(p) for p in paths)

    r = app_client.delete("/api/v1/models/resnet/versions/1.0.0", headers=admin_headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked"
    assert r.json()["revoked_at"]
    assert sorted(ctx.repo.list_targets()) == ["resnet/1.1.0/default/bundle.tar"]
    assert not any(f.exists() for f in files)

    # idempotent; one audit row
    assert app_client.delete("/api/v1/models/resnet/versions/1.0.0", headers=admin_headers).status_code == 200
    revokes = audit_actions(app_client, admin_headers, "model.revoke")
    assert [(a["target_id"], sorted(a["details"]["targets"])) for a in revokes] == [("resnet@1.0.0", paths)]

    # a revoked version number stays burnt; the release floor does not move back
    r = push(app_client, operator_headers, "resnet", "1.0.0", onnx_model())
    assert r.status_code == 409
    assert "revoked" in r.json()["detail"]
    assert app_client.delete("/api/v1/models/resnet/versions/1.1.0", headers=admin_headers).status_code == 200
    summary = app_client.get("/api/v1/models", headers=admin_headers).json()[0]
    assert (summary["latest_version"], summary["last_release"]) == (None, 2)
    assert push(app_client, operator_headers, "resnet", "1.2.0", onnx_model()).json()["release"] == 3
    assert app_client.delete("/api/v1/models/resnet/versions/7.0.0", headers=admin_headers).status_code == 404


def test_supplied_validation_vectors(app_client, operator_headers, ctx, onnx_model, tmp_path):
    m = onnx_model(in_dim=4, out_dim=3, seed=7)
    x = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    r = push(app_client, operator_headers, "clf", "1.0.0", m, validation=npz_bytes(**{"inputs/x": x}))
    assert r.status_code == 201, r.text
    out = tmp_path / "bundle"
    extract_bundle(ctx.repo.target_file("clf/1.0.0/default/bundle.tar"), out)
    with np.load(out / "validation.npz") as vz:
        np.testing.assert_array_equal(vz["inputs/x"], x)
        np.testing.assert_allclose(vz["outputs/y"], reference_output(x, seed=7), rtol=1e-5)

    # uploaded expected outputs must agree with what the model computes
    good = {"inputs/x": x, "outputs/y": reference_output(x, seed=7)}
    assert (
        push(app_client, operator_headers, "clf", "1.0.1", m, validation=npz_bytes(**good)).status_code == 201
    )
    wrong = {"inputs/x": x, "outputs/y": reference_output(x, seed=7) + 1}
    r = push(app_client, operator_headers, "clf", "1.0.2", m, validation=npz_bytes(**wrong))
    assert r.status_code == 422
    assert "differs from the uploaded outputs/y" in r.json()["detail"]

    bad = {
        "wrong dtype": (
            npz_bytes(**{"inputs/x": x.astype(np.float64)}),
            "is float64, the model expects float32",
        ),
        "wrong shape": (npz_bytes(**{"inputs/x": x.reshape(4, 3)}), "has shape [4, 3]"),
        "missing input": (npz_bytes(**{"inputs/z": x}), "unexpected keys ['inputs/z']"),
        "not an npz": (b"PK\x03\x04 nope", "not a readable .npz"),
    }
    for label, (payload, message) in bad.items():
        r = push(app_client, operator_headers, "clf", "1.0.3", m, validation=payload)
        assert r.status_code == 422, label
        assert message in r.json()["detail"], (label, r.json())
    assert sorted(ctx.repo.list_targets()) == ["clf/1.0.0/default/bundle.tar", "clf/1.0.1/default/bundle.tar"]


def test_model_producing_nan_on_validation_inputs_is_refused(app_client, operator_headers, ctx, onnx_model):
    m = onnx_model(nan_on_negative=True)
    negative = npz_bytes(**{"inputs/x": -np.ones((2, 4), np.float32)})
    r = push(app_client, operator_headers, "nanny", "1.0.0", m, validation=negative)
    assert r.status_code == 422
    assert "not finite" in r.json()["detail"]
    nothing_published(ctx)
    # the same model with its generated inputs in [0, 1) is fine
    assert push(app_client, operator_headers, "nanny", "1.0.0", m).status_code == 201


def test_failure_after_publish_unpublishes(ctx, onnx_model, tmp_path):
    """The transaction fails after the bundle was published: the compensation takes it back."""
    upload = push_upload(ctx, tmp_path, onnx_model(), "1.0.0")
    seen = {}

    def push_then_fail() -> None:
        with ctx.db.session_scope() as session:
            CatalogService(session, ctx).push("resnet", upload, CLI_PRINCIPAL)
            seen["listed"] = ctx.repo.get_target("resnet/1.0.0/default/bundle.tar")
            seen["stored"] = ctx.repo.target_file("resnet/1.0.0/default/bundle.tar")
            assert seen["stored"].exists()
            raise Boom

    with pytest.raises(Boom):
        push_then_fail()
    assert seen["listed"] is not None  # it was published before the transaction failed
    stored = seen["stored"]
    nothing_published(ctx, untouched=False)
    assert not stored.exists()
    assert ctx.repo.versions()["targets"] == 3  # published, then un-published

    # and the same push then succeeds normally
    with ctx.db.session_scope() as session:
        out = CatalogService(session, ctx).push(
            "resnet", push_upload(ctx, tmp_path, onnx_model("again.onnx"), "1.0.0"), CLI_PRINCIPAL
        )
    assert out.release == 1
    assert ctx.repo.get_target("resnet/1.0.0/default/bundle.tar") is not None


def test_failed_revocation_relists_the_targets(app_client, operator_headers, ctx, onnx_model):
    push(app_client, operator_headers, "resnet", "1.0.0", onnx_model())
    path = "resnet/1.0.0/default/bundle.tar"
    before = ctx.repo.get_target(path)
    stored = ctx.repo.target_file(path)
    unlisted_before_commit = []

    def revoke_then_fail() -> None:
        with ctx.db.session_scope() as session:
            CatalogService(session, ctx).revoke("resnet", "1.0.0", CLI_PRINCIPAL)
            unlisted_before_commit.append(ctx.repo.get_target(path) is None)
            raise Boom

    with pytest.raises(Boom):
        revoke_then_fail()
    assert unlisted_before_commit == [True]
    assert ctx.repo.get_target(path) == before
    assert stored.exists()
    assert (
        app_client.get("/api/v1/models/resnet/versions/1.0.0", headers=operator_headers).json()["status"]
        == "active"
    )


def test_concurrent_pushes_get_distinct_releases(ctx, onnx_model, tmp_path):
    """Pushes of one model from several threads: the row lock hands out releases one at a time."""
    import threading

    model = onnx_model()
    uploads = [push_upload(ctx, tmp_path, model, f"1.{i}.0") for i in range(4)]
    results: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(upload: PushUpload) -> None:
        try:
            with ctx.db.session_scope() as session:
                results[upload.version] = (
                    CatalogService(session, ctx).push("busy", upload, CLI_PRINCIPAL).release
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(u,)) for u in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(results.values()) == [1, 2, 3, 4]
    listed = ctx.repo.list_targets()
    assert {t.custom["version"]: t.custom["release"] for t in listed.values()} == results
    with ctx.db.session_scope() as s:
        assert s.query(CatalogModel).one().last_release == 4
