"""The device's cloud client against a real Seldon MLServer (``mlserver`` + ``mlserver-sklearn``)
serving a scikit-learn classifier over TLS, with no fleetota code on that side: unsure digits of
the real onnxruntime edge model escalate and MLServer's answers come back, MLServer's response
format (``model_name``, FP64 ``predict_proba``, INT64 ``predict``) is read, and a stopped MLServer
leaves the edge answering."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from device_client.protocol.routing import parse_routing_policy
from device_client.routing import OipClient, RoutingEnvironment, build_router
from server.digits import OUTPUT, build_digits_pair, digits_split
from tests.helpers.mlserver import Mlserver, MlserverUnavailable, SklearnModel, mlserver_venv, train_model
from tests.helpers.pki import web_server_cert
from tests.helpers.routing_fixtures import session_edge
from tests.helpers.tls_proxy import tls_terminator

#: the module's tests share one MLServer; installing it (the first time only) takes minutes
pytestmark = pytest.mark.timeout(1800)

MODEL, VERSION = "digits-logreg", "1"
THRESHOLD = 0.9


@pytest.fixture(scope="module")
def venv() -> Path:
    try:
        return mlserver_venv()
    except MlserverUnavailable as exc:
        pytest.skip(f"MLServer is not installed and could not be: {exc}")


class Stack:
    """MLServer behind a TLS terminator: ``url`` is https, verified by ``ca``."""

    def __init__(self, server: Mlserver, url: str, model: SklearnModel, ca: Path) -> None:
        self.server, self.url, self.model, self.ca = server, url, model, ca


@pytest.fixture(scope="module")
def stack(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("mlserver")
    model = train_model(venv, base / "models" / MODEL, MODEL, VERSION, digits_split())
    ca, cert, key = web_server_cert(base, "mlserver")
    server = Mlserver(venv, base / "models", MODEL)
    try:
        with tls_terminator(server.port, cert, key) as url:
            yield Stack(server, url, model, ca)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory):
    return session_edge(build_digits_pair(tmp_path_factory.mktemp("onnx")).edge)


def policy(url: str, ca: Path, **cloud: object) -> dict:
    return {
        "mode": "prefer_edge",
        "confidence": {"output": OUTPUT, "softmax": False, "kind": "max_prob", "threshold": THRESHOLD},
        "cloud": {
            "endpoint": url,
            "ca_pem": ca.read_text(),
            "model": MODEL,
            "timeout_ms": 5000,
            "outputs": {OUTPUT: "predict_proba"},
            **cloud,
        },
        "budget": {"per_minute": 6000, "burst": 1000},
        "breaker": {"failures": 1000},
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mlserver_answers_in_its_own_format(stack, dtype):
    """scikit-learn keeps the input's float type: FP32 in, FP32 out; FP64 in, FP64 out."""
    x_val = digits_split()[1][:8].astype(dtype)
    http = httpx.Client(verify=ssl.create_default_context(cafile=stack.ca), trust_env=False)
    client = OipClient(stack.url, MODEL, VERSION, timeout_s=10, http=http)
    try:
        assert client.ready()
        ans = client.infer({"x": x_val}, outputs=["predict_proba"], shapes={"predict_proba": (8, 10)})
        assert (ans.model_name, ans.model_version) == (MODEL, VERSION)
        proba = ans.outputs["predict_proba"]
        assert proba.dtype == dtype
        np.testing.assert_allclose(proba, stack.model.expected_proba[:8], rtol=1e-5, atol=1e-6)
        labels = client.infer({"x": x_val}, outputs=["predict"]).outputs["predict"]
        assert labels.dtype.kind == "i"
        np.testing.assert_array_equal(labels.ravel(), stack.model.expected_label[:8])
    finally:
        client.close()


def test_unsure_digits_escalate_to_mlserver_and_its_answers_come_back(stack, edge, tmp_path):
    model, ca = stack.model, stack.ca
    x_val = digits_split()[1]
    router = build_router(
        parse_routing_policy(policy(stack.url, ca, version=VERSION)),
        RoutingEnvironment(data_dir=tmp_path),
        edge,
        model="digits",
    )
    try:
        conf = edge({"x": x_val})[OUTPUT].max(axis=1)
        unsure = np.flatnonzero(conf < THRESHOLD)[:6]
        sure = np.flatnonzero(conf >= THRESHOLD)[:3]
        assert len(unsure) > 0
        assert len(sure) > 0
        for i in unsure:
            a = router.answer({"x": x_val[i : i + 1]})
            assert (a.answered_by, a.reason, a.cloud_version) == ("cloud", "escalated", VERSION), a
            assert a.outputs[OUTPUT].dtype == np.float32  # MLServer's FP64 under the edge's dtype
            np.testing.assert_allclose(a.outputs[OUTPUT][0], model.expected_proba[i], rtol=1e-5, atol=1e-6)
        for i in sure:
            assert router.answer({"x": x_val[i : i + 1]}).answered_by == "edge"
    finally:
        router.close()


def test_a_version_mlserver_does_not_serve_is_a_failure_and_the_edge_answers(stack, edge, tmp_path):
    ca = stack.ca
    x = digits_split()[1]
    router = build_router(
        parse_routing_policy(policy(stack.url, ca, version="7")),
        RoutingEnvironment(data_dir=tmp_path),
        edge,
        model="digits",
    )
    try:
        i = int(np.argmin(edge({"x": x})[OUTPUT].max(axis=1)))
        a = router.answer({"x": x[i : i + 1]})
        assert (a.answered_by, a.fallback) == ("edge", True)
        assert a.reason.startswith("cloud_failed:"), a.reason
    finally:
        router.close()


def test_mlserver_stopped_the_edge_answers(stack, edge, tmp_path):
    """Last in this module: it stops the module's MLServer."""
    ca = stack.ca
    x = digits_split()[1]
    router = build_router(
        parse_routing_policy(policy(stack.url, ca)),
        RoutingEnvironment(data_dir=tmp_path),
        edge,
        model="digits",
    )
    try:
        order = np.argsort(edge({"x": x})[OUTPUT].max(axis=1))
        assert router.answer({"x": x[order[0] : order[0] + 1]}).answered_by == "cloud"
        stack.server.stop()
        i = int(order[1])
        a = router.answer({"x": x[i : i + 1]})
        assert (a.answered_by, a.fallback, a.reason) == ("edge", True, "cloud_failed:unreachable")
        np.testing.assert_array_equal(a.outputs[OUTPUT], edge({"x": x[i : i + 1]})[OUTPUT])
    finally:
        router.close()
