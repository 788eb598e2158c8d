"""The router's modes and its handling of every cloud fault, with a real onnxruntime edge model and
a real OIP peer running the cloud model: the caller always gets exactly one answer, and who gave
it (and why) is said and counted."""

from __future__ import annotations

import numpy as np
import pytest

from device_client.routing.cache import AnswerCache
from tests.helpers.oip_server import OipPeer, PeerModel, serve_oip
from tests.helpers.routing_fixtures import SURE, UNSURE, Clock, make_router, session_edge
from tests.helpers.routing_models import classifier, logits_of


@pytest.fixture
def edge(tmp_path):
    return session_edge(classifier(tmp_path / "edge.onnx", seed=0))


@pytest.fixture
def peer(tmp_path) -> OipPeer:
    # the cloud model: another classifier, so its answers are recognisably not the edge's
    return OipPeer([PeerModel("big", "2.0.0", classifier(tmp_path / "big.onnx", seed=7))])


def cloud_logits(x):
    return logits_of(x, seed=7)


def test_edge_only_never_asks_the_cloud(tmp_path, edge, peer):
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, mode="edge_only")
        a = r.answer({"x": UNSURE})
    assert (a.answered_by, a.reason, a.fallback) == ("edge", "edge_only", False)
    assert a.confidence == pytest.approx(1 / 3, rel=1e-5)
    assert peer.infer_count == 0
    w = r.stats.drain()
    assert (w["requests"], w["edge"], w["escalations"]) == (1, 1, 0)


def test_prefer_edge_answers_sure_cases_itself_and_escalates_unsure_ones(tmp_path, edge, peer):
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url)
        sure = r.answer({"x": SURE})
        unsure = r.answer({"x": UNSURE + 0.01})
    assert (sure.answered_by, sure.reason, sure.confident) == ("edge", "confident", True)
    np.testing.assert_allclose(sure.outputs["logits"], logits_of(SURE), rtol=1e-5)
    assert (unsure.answered_by, unsure.reason, unsure.confident) == ("cloud", "escalated", False)
    np.testing.assert_allclose(unsure.outputs["logits"], cloud_logits(UNSURE + 0.01), rtol=1e-5)
    assert unsure.cloud_version == "2.0.0"
    assert peer.infer_count == 1
    w = r.stats.drain()
    assert (w["requests"], w["edge"], w["cloud"], w["escalations"], w["escalation_rate"]) == (2, 1, 1, 1, 0.5)
    assert w["cloud_p95_ms"] is not None
    assert w["cloud_compared"] == 1


def test_agreement_counts_top1_matches_between_edge_and_cloud(tmp_path, edge, peer):
    xs = np.random.default_rng(3).normal(0, 0.05, (20, 1, 4)).astype(np.float32)  # all unsure
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, budget={"burst": 100})
        for x in xs:
            assert r.answer({"x": x}).answered_by == "cloud"
    matches = sum(int(np.argmax(logits_of(x)) == np.argmax(cloud_logits(x))) for x in xs)
    w = r.stats.drain()
    assert (w["cloud_compared"], w["cloud_matches"]) == (20, matches)
    assert 0 < matches < 20  # two different models: some agree, some do not
    assert w["cloud_agreement"] == pytest.approx(matches / 20)


@pytest.mark.parametrize(
    ("fault", "value", "kind"),
    [
        ("wrong_shape", "flat", "wrong_shape"),
        ("wrong_shape", "short", "wrong_shape"),
        ("nan", True, "nan"),
        ("lie_name", "small", "lying"),
        ("no_outputs", True, "missing_output"),
        ("status", 503, "http_error"),
        ("down", True, "unreachable"),
    ],
)
def test_any_cloud_fault_returns_the_edge_answer_and_is_counted(tmp_path, edge, peer, fault, value, kind):
    setattr(peer.faults, fault, value)
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url)
        a = r.answer({"x": UNSURE})
    assert (a.answered_by, a.reason, a.fallback) == ("edge", f"cloud_failed:{kind}", True)
    np.testing.assert_allclose(a.outputs["logits"], logits_of(UNSURE), rtol=1e-5)
    w = r.stats.drain()
    assert (w["cloud_failed"], w["cloud_failures"], w["requests"], w["edge"]) == (1, {kind: 1}, 1, 1)


def test_a_lying_version_is_caught_when_the_policy_pins_one(tmp_path, edge, peer):
    peer.faults.lie_version = "2.0.1"
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, cloud={"version": "2.0.0"})
        assert r.answer({"x": UNSURE}).reason == "cloud_failed:lying"


def test_a_slow_cloud_costs_at_most_the_timeout(tmp_path, edge, peer):
    peer.faults.slow_s = 5.0
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, cloud={"timeout_ms": 200})
        a = r.answer({"x": UNSURE})
        assert peer.completed == 0  # answered while the cloud was still working on it
    assert (a.answered_by, a.reason) == ("edge", "cloud_failed:timeout")


def test_the_budget_limits_escalations_and_the_edge_answer_stands(tmp_path, edge, peer):
    clock = Clock()
    with serve_oip(peer) as url:
        r = make_router(
            tmp_path, edge, url, clock=clock, budget={"per_minute": 6, "burst": 2}, cache={"max_bytes": 0}
        )
        answers = [r.answer({"x": UNSURE + i / 100}) for i in range(4)]
        assert [a.answered_by for a in answers] == ["cloud", "cloud", "edge", "edge"]
        assert answers[2].reason == "budget_limited"
        clock.advance(10)  # 6 a minute: one more token
        assert r.answer({"x": UNSURE}).answered_by == "cloud"
    assert peer.infer_count == 3
    w = r.stats.drain()
    assert (w["escalations"], w["budget_limited"], w["cloud"], w["edge"], w["cloud_calls"]) == (5, 2, 3, 2, 3)


def test_a_429_holds_every_call_until_retry_after(tmp_path, edge, peer):
    clock = Clock()
    peer.faults.rate_limit_next = 1
    peer.faults.retry_after = "30"
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, clock=clock, mode="cloud_only", cache={"max_bytes": 0})
        first = r.answer({"x": SURE})
        assert first.reason == "cloud_failed:rate_limited"
        assert r.answer({"x": SURE}).reason == "budget_limited"  # not sent: the cloud said wait
        assert peer.infer_count == 1
        clock.advance(31)
        assert r.answer({"x": SURE}).answered_by == "cloud"
    assert r.breaker.state.value == "closed"  # a 429 is no sign of a broken cloud


def test_the_breaker_opens_skips_the_cloud_and_probes_after_open_s(tmp_path, edge, peer):
    clock = Clock()
    peer.faults.status = 500
    with serve_oip(peer) as url:
        r = make_router(
            tmp_path,
            edge,
            url,
            clock=clock,
            breaker={"failures": 2, "open_s": 60},
            cache={"max_bytes": 0},
            budget={"burst": 100},
        )
        reasons = [r.answer({"x": UNSURE}).reason for _ in range(4)]
        assert reasons == ["cloud_failed:http_error"] * 2 + ["breaker_open"] * 2
        assert peer.infer_count == 2
        peer.faults.status = None
        clock.advance(61)
        assert r.answer({"x": UNSURE}).answered_by == "cloud"  # the probe
        assert r.answer({"x": UNSURE}).answered_by == "cloud"
    w = r.stats.drain()
    assert (w["breaker_open"], w["cloud_failed"], w["cloud"]) == (2, 2, 2)


def test_prefer_cloud_asks_first_then_falls_back_to_cache_then_edge(tmp_path, edge, peer):
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, mode="prefer_cloud", confidence=None)
        a = r.answer({"x": SURE})
        assert (a.answered_by, a.reason, a.confidence) == ("cloud", "cloud_first", None)
        assert r.wait_idle(10)
        peer.faults.status = 502
        cached = r.answer({"x": SURE})
        fresh = r.answer({"x": SURE + 1})
    assert (cached.answered_by, cached.reason, cached.fallback) == ("cache", "cloud_failed:http_error", True)
    np.testing.assert_allclose(cached.outputs["logits"], cloud_logits(SURE), rtol=1e-5)
    assert cached.cloud_version == "2.0.0"
    assert (fresh.answered_by, fresh.fallback) == ("edge", True)
    w = r.stats.drain()
    assert (w["cloud"], w["cache"], w["edge"], w["escalation_rate"]) == (1, 1, 1, 1.0)


def test_cloud_only_is_not_held_to_the_budget_and_marks_its_fallbacks(tmp_path, edge, peer):
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, mode="cloud_only", budget={"per_minute": 0, "burst": 1})
        assert [r.answer({"x": SURE}).answered_by for _ in range(3)] == ["cloud"] * 3
        peer.faults.down = True
        a = r.answer({"x": SURE + 5})
    assert (a.answered_by, a.reason, a.fallback) == ("edge", "cloud_failed:unreachable", True)


def test_an_edge_error_propagates_and_nothing_is_counted(tmp_path, peer):
    def broken(inputs):
        raise RuntimeError("the edge model crashed")

    with serve_oip(peer) as url:
        r = make_router(tmp_path, broken, url, mode="prefer_cloud")
        with pytest.raises(RuntimeError, match="crashed"):
            r.answer({"x": SURE})
    assert peer.infer_count == 0
    assert r.stats.drain()["requests"] == 0


def test_an_edge_output_the_policy_does_not_know_is_unsure(tmp_path, edge, peer):
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, confidence={"output": "probs"})
        a = r.answer({"x": SURE})
    assert (a.answered_by, a.confidence) == ("cloud", None)
    assert r.stats.drain()["confidence_errors"] == 1


def test_no_cloud_client_falls_back_and_says_why(tmp_path, edge):
    r = make_router(tmp_path, edge, None)
    a = r.answer({"x": UNSURE})
    assert (a.answered_by, a.reason) == ("edge", "cloud_failed:unconfigured")
    assert r.status()["cloud_configured"] is False


def test_a_bug_on_the_cloud_path_still_answers_from_the_edge(tmp_path, edge, peer):
    class BrokenCache(AnswerCache):
        def get(self, key):
            raise RuntimeError("a bug")

    peer.faults.status = 500
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url)
        r.cache = BrokenCache(tmp_path / "broken", max_bytes=1 << 20, ttl_s=60)
        a = r.answer({"x": UNSURE})
    assert (a.answered_by, a.reason, a.fallback) == ("edge", "cloud_failed:internal", True)
    w = r.stats.drain()
    assert (w["requests"], w["edge"], w["cloud_failures"]) == (1, 1, {"http_error": 1, "internal": 1})


def test_inputs_that_cannot_be_sent_fall_back_to_the_edge(tmp_path, peer):
    def python_edge(inputs):
        return {"logits": np.zeros((1, 3), np.float32)}  # unsure: escalates

    with serve_oip(peer) as url:
        r = make_router(tmp_path, python_edge, url)
        a = r.answer({"x": np.array([[object()]], dtype=object)})
    assert (a.answered_by, a.reason) == ("edge", "cloud_failed:unencodable")
    assert peer.infer_count == 0
