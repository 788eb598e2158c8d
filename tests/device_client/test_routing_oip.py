"""The Open Inference Protocol client against a real HTTP(S) peer running real onnxruntime
sessions: correct answers and datatypes, every way a cloud answer can be wrong, timeouts, 429,
and the credentials of the fleet endpoint (mTLS + device token) and of an external one."""

from __future__ import annotations

import ssl
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from device_client.protocol.routing import parse_routing_policy
from device_client.routing import (
    CloudConfigError,
    CloudFailure,
    OipClient,
    RoutingEnvironment,
    build_cloud_client,
)
from device_client.routing.oip import decode_tensor
from server.trust.keys import atomic_write, private_key_pem
from server.trust.pki import CA_CERT_FILE, FleetCA, cert_pem
from tests.helpers.oip_server import OipPeer, PeerModel, serve_oip
from tests.helpers.pki import make_csr
from tests.helpers.routing_models import classifier, typed_echo

X = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]], np.float32)


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    return {"big": classifier(tmp_path / "big.onnx", seed=7), "echo": typed_echo(tmp_path / "echo.onnx")}


@pytest.fixture
def peer(models) -> OipPeer:
    return OipPeer(
        [
            PeerModel("big", "1.0.0", models["big"]),
            PeerModel("big", "2.0.0", models["big"]),
            PeerModel("echo", "1", models["echo"]),
        ]
    )


def client(url: str, model: str = "big", version: str | None = None, timeout_s: float = 5.0, **kw):
    return OipClient(url, model, version, timeout_s=timeout_s, **kw)


def expected(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def failure(fn) -> CloudFailure:
    with pytest.raises(CloudFailure) as info:
        fn()
    return info.value


def test_infer_gives_the_cloud_models_answer(peer, models):
    with serve_oip(peer) as url:
        ans = client(url).infer({"x": X}, outputs=["logits"], shapes={"logits": (2, 3)})
        np.testing.assert_allclose(ans.outputs["logits"], expected(models["big"], X), rtol=1e-6)
        assert (ans.model_name, ans.model_version) == ("big", "2.0.0")  # the active version
        pinned = client(url, version="1.0.0").infer({"x": X})
        assert pinned.model_version == "1.0.0"
    paths = [s["path"] for s in peer.seen]
    assert paths == ["/v2/models/big/infer", "/v2/models/big/versions/1.0.0/infer"]
    body = peer.seen[0]["body"]
    assert body["inputs"][0] == {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}
    assert body["outputs"] == [{"name": "logits"}]


def test_datatypes_round_trip(peer):
    inputs = {
        "f32": np.array([[1.5, -2.25]], np.float32),
        "f64": np.array([[1e-300, 3.0]], np.float64),
        "i32": np.array([[-(2**31), 2**31 - 1]], np.int32),
        "i64": np.array([[-(2**62), 2**62]], np.int64),
        "u8": np.array([[0, 255]], np.uint8),
        "b": np.array([[True, False]]),
        "f16": np.array([[0.5, 65504]], np.float16),
    }
    with serve_oip(peer) as url:
        ans = client(url, "echo", "1").infer(inputs)
    datatypes = {i["name"]: i["datatype"] for i in peer.seen[0]["body"]["inputs"]}
    assert datatypes == {
        "f32": "FP32",
        "f64": "FP64",
        "i32": "INT32",
        "i64": "INT64",
        "u8": "UINT8",
        "b": "BOOL",
        "f16": "FP16",
    }
    for name, arr in inputs.items():
        out = ans.outputs[f"{name}_out"]
        assert out.dtype == arr.dtype
        np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    ("faults", "version", "kind"),
    [
        ({"lie_name": "small"}, None, "lying"),
        ({"lie_version": "9.9.9"}, "1.0.0", "lying"),
        ({"wrong_shape": "flat"}, None, "wrong_shape"),
        ({"wrong_shape": "short"}, None, "wrong_shape"),
        ({"nan": True}, None, "nan"),
        ({"no_outputs": True}, None, "missing_output"),
        ({"status": 500}, None, "http_error"),
        ({"status": 307}, None, "http_error"),  # a redirect is never followed
        ({"down": True}, None, "unreachable"),
    ],
)
def test_a_bad_cloud_answer_is_a_cloud_failure(peer, faults, version, kind):
    for k, v in faults.items():
        setattr(peer.faults, k, v)
    with serve_oip(peer) as url:
        f = failure(
            lambda: client(url, version=version).infer(
                {"x": X}, outputs=["logits"], shapes={"logits": (2, 3)}
            )
        )
    assert f.kind == kind, f


def test_an_unpinned_version_accepts_whatever_the_cloud_runs(peer):
    peer.faults.lie_version = "3.0.0"
    with serve_oip(peer) as url:
        assert client(url).infer({"x": X}).model_version == "3.0.0"


def test_unknown_model_is_an_http_error(peer):
    with serve_oip(peer) as url:
        f = failure(lambda: client(url, "nope").infer({"x": X}))
    assert f.kind == "http_error"
    assert "unknown model" in str(f)


def test_a_429_carries_its_retry_after(peer):
    peer.faults.rate_limit_next = 2
    with serve_oip(peer) as url:
        f = failure(lambda: client(url).infer({"x": X}))
        assert (f.kind, f.retry_after_s) == ("rate_limited", 5.0)
        peer.faults.retry_after = None
        f = failure(lambda: client(url).infer({"x": X}))
        assert (f.kind, f.retry_after_s) == ("rate_limited", 1.0)
        assert client(url).infer({"x": X}).model_name == "big"


def test_a_slow_cloud_times_out(peer):
    peer.faults.slow_s = 3.0
    with serve_oip(peer) as url:
        f = failure(lambda: client(url, timeout_s=0.2).infer({"x": X}))
        assert peer.completed == 0  # given up before the cloud answered
    assert f.kind == "timeout"


def test_nothing_listening_is_unreachable(peer):
    with serve_oip(peer) as url:
        pass
    assert failure(lambda: client(url, timeout_s=1).infer({"x": X})).kind == "unreachable"


def test_an_oversized_answer_is_refused(peer):
    with serve_oip(peer) as url:
        f = failure(lambda: client(url, max_response_bytes=64).infer({"x": X}))
    assert f.kind == "too_large"


def test_inputs_json_cannot_carry_are_refused_before_sending(peer):
    with serve_oip(peer) as url:
        f = failure(lambda: client(url).infer({"x": np.array([[np.nan, 0, 0, 0]], np.float32)}))
        assert f.kind == "unencodable"
        f = failure(lambda: client(url).infer({"x": np.array([["a", "b"]])}))
        assert f.kind == "unencodable"
    assert peer.infer_count == 0


def test_ready(peer):
    with serve_oip(peer) as url:
        assert client(url).ready()
        assert client(url, version="1.0.0").ready()
        assert not client(url, version="7.0.0").ready()
        assert not client(url, "nope").ready()
    assert not client(url, timeout_s=0.5).ready()


@pytest.mark.parametrize(
    ("tensor", "kind"),
    [
        ({"name": "y", "datatype": "FP32", "shape": [2], "data": [1.0, "x"]}, "bad_answer"),
        ({"name": "y", "datatype": "INT64", "shape": [2], "data": [1.5, 2.0]}, "bad_answer"),
        ({"name": "y", "datatype": "INT8", "shape": [1], "data": [300]}, "bad_answer"),
        ({"name": "y", "datatype": "BYTES", "shape": [1], "data": ["x"]}, "bad_answer"),
        ({"name": "y", "datatype": "FP32", "shape": [-1], "data": []}, "bad_answer"),
        ({"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}, "wrong_shape"),
        ({"name": "y", "datatype": "FP64", "shape": [1], "data": [float("inf")]}, "nan"),
        ({"name": "y", "datatype": "FP16", "shape": [1], "data": [1e10]}, "bad_answer"),
        ({"datatype": "FP32", "shape": [1], "data": [1]}, "bad_answer"),
        ("y", "bad_answer"),
    ],
)
def test_decode_refuses_malformed_tensors(tensor, kind):
    assert failure(lambda: decode_tensor(tensor)).kind == kind


def test_decode_accepts_nested_data_and_integers_for_floats():
    name, arr = decode_tensor({"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]})
    assert (name, arr.dtype, arr.tolist()) == ("y", np.float32, [[1, 2], [3, 4]])


# ---------------------------------------------------------------- credentials and TLS


@pytest.fixture
def pki(tmp_path):
    ca = FleetCA(tmp_path / "ca")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert, server_keyfile = tmp_path / "srv.crt", tmp_path / "srv.key"
    issued = ca.issue_server(server_key.public_key(), "cloud", [], ["127.0.0.1"])
    atomic_write(server_cert, cert_pem(issued).encode())
    atomic_write(server_keyfile, private_key_pem(server_key), mode=0o600)
    csr_pem, dev_key = make_csr("dev-1")
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    dev_cert, dev_keyfile = tmp_path / "dev.crt", tmp_path / "dev.key"
    atomic_write(dev_cert, cert_pem(ca.issue_client(csr, "dev-1", 30)).encode())
    atomic_write(dev_keyfile, private_key_pem(dev_key), mode=0o600)
    return {
        "ca": tmp_path / "ca" / CA_CERT_FILE,
        "server": (server_cert, server_keyfile),
        "device": (dev_cert, dev_keyfile),
    }


def server_tls(pki, *, require_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*map(str, pki["server"]))
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(pki["ca"]))
    return ctx


def fleet_policy(**cloud):
    return parse_routing_policy({"mode": "prefer_cloud", "cloud": {"model": "big", **cloud}}).cloud


def test_the_fleet_endpoint_gets_the_device_certificate_and_token(peer, pki, tmp_path):
    cert, key = pki["device"]
    with serve_oip(peer, server_tls(pki, require_client=True)) as url:
        env = RoutingEnvironment(
            data_dir=tmp_path,
            fleet_url=url,
            device_token="tok-123",
            client_cert=cert,
            client_key=key,
            fleet_ca=pki["ca"],
        )
        ans = build_cloud_client(fleet_policy(), env).infer({"x": X})
        assert ans.model_name == "big"
        seen = peer.seen[-1]
        assert seen["client_cert"] == "dev-1"
        assert seen["headers"]["authorization"] == "Bearer tok-123"
        no_cert = RoutingEnvironment(data_dir=tmp_path, fleet_url=url, device_token="tok", fleet_ca=pki["ca"])
        f = failure(lambda: build_cloud_client(fleet_policy(), no_cert).infer({"x": X}))
        assert f.kind == "unreachable"
        wrong_ca = RoutingEnvironment(data_dir=tmp_path, fleet_url=url, client_cert=cert, client_key=key)
        f = failure(lambda: build_cloud_client(fleet_policy(), wrong_ca).infer({"x": X}))
        assert f.kind == "unreachable"


def test_the_fleet_endpoint_needs_a_url_and_https(tmp_path):
    with pytest.raises(CloudConfigError, match="no fleet cloud URL"):
        build_cloud_client(fleet_policy(), RoutingEnvironment(data_dir=tmp_path))
    with pytest.raises(CloudConfigError, match="must be https"):
        build_cloud_client(
            fleet_policy(), RoutingEnvironment(data_dir=tmp_path, fleet_url="http://127.0.0.1:1")
        )
    lab = RoutingEnvironment(data_dir=tmp_path, fleet_url="http://127.0.0.1:1", insecure_http=True)
    assert build_cloud_client(fleet_policy(), lab).infer_url == "http://127.0.0.1:1/v2/models/big/infer"


def external_policy(url: str, pki, **cloud):
    doc = {
        "endpoint": url,
        "model": "big",
        "ca_pem": pki["ca"].read_text(),
        "credential": {"header": "X-Api-Key", "prefix": "Key ", "secret": "triton-key"},
        **cloud,
    }
    return parse_routing_policy({"mode": "prefer_cloud", "cloud": doc}).cloud


def test_an_external_endpoint_gets_its_credential_and_never_the_device_token(peer, pki, tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "triton-key").write_text("s3cret\n")
    peer.require_header = ("X-Api-Key", "Key s3cret")
    cert, key = pki["device"]
    env = RoutingEnvironment(
        data_dir=tmp_path,
        fleet_url="https://fleet.invalid",
        device_token="tok-123",
        client_cert=cert,
        client_key=key,
        fleet_ca=pki["ca"],
    )
    with serve_oip(peer, server_tls(pki, require_client=False)) as url:
        ans = build_cloud_client(external_policy(url, pki), env).infer({"x": X})
        assert ans.model_name == "big"
        seen = peer.seen[-1]
        assert "authorization" not in seen["headers"]
        assert seen["client_cert"] is None
        (secrets / "triton-key").write_text("wrong\n")
        f = failure(lambda: build_cloud_client(external_policy(url, pki), env).infer({"x": X}))
        assert (f.kind, "401" in str(f)) == ("http_error", True)
        (secrets / "triton-key").write_text("s3cret\n")
        other = external_policy(url, pki, ca_pem=FleetCA(tmp_path / "other-ca").cert_pem)
        f = failure(lambda: build_cloud_client(other, env).infer({"x": X}))
        assert f.kind == "unreachable"


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "not readable"), ("", "one line"), ("two\nlines", "one line"), ("tab\there", "one line")],
)
def test_a_missing_or_unsafe_secret_is_a_configuration_error(pki, tmp_path, content, needle):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    if content is not None:
        (secrets / "triton-key").write_text(content)
    env = RoutingEnvironment(data_dir=tmp_path)
    with pytest.raises(CloudConfigError, match=needle):
        build_cloud_client(external_policy("https://127.0.0.1:9", pki), env)


def test_a_secret_behind_a_symlink_is_not_followed(pki, tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (tmp_path / "elsewhere").write_text("s3cret")
    (secrets / "triton-key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CloudConfigError, match="not readable"):
        build_cloud_client(external_policy("https://127.0.0.1:9", pki), RoutingEnvironment(data_dir=tmp_path))
