"""The router beyond single requests: audits off the caller's path, long offline spells served from
edge and cache (across a restart too), split inference, concurrent callers each answered exactly
once, a full disk under the cache, and the factory wiring it to a device's settings."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from device_client.config import DeviceSettings
from device_client.enroll import Identity
from device_client.protocol.routing import parse_routing_policy
from device_client.routing import RoutingEnvironment, RoutingStats, build_router, host_edge
from device_client.routing.factory import CACHE_DIR
from device_client.runtime import ModelHost
from tests.helpers.fs import tiny_filesystem
from tests.helpers.oip_server import OipPeer, PeerModel, serve_oip
from tests.helpers.routing_fixtures import SURE, UNSURE, Clock, make_router, policy_doc, session_edge
from tests.helpers.routing_models import classifier, logits_of, split_pair


@pytest.fixture
def edge(tmp_path):
    return session_edge(classifier(tmp_path / "edge.onnx", seed=0))


@pytest.fixture
def peer(tmp_path) -> OipPeer:
    return OipPeer([PeerModel("big", "2.0.0", classifier(tmp_path / "big.onnx", seed=7))])


def test_audits_ask_the_cloud_about_sure_answers_off_the_callers_path(tmp_path, edge, peer):
    peer.faults.hold = threading.Event()
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, audit_rate=0.5, rand=lambda: 0.25)
        a = r.answer({"x": SURE})
        assert (a.answered_by, a.reason) == ("edge", "confident")  # given while the audit waits
        assert peer.completed == 0
        peer.faults.hold.set()
        assert r.wait_idle(10)
    assert peer.completed == 1
    w = r.stats.drain()
    assert (w["audits"], w["escalations"], w["cloud_compared"], w["edge"], w["requests"]) == (1, 0, 1, 1, 1)
    assert w["cloud_agreement"] == float(np.argmax(logits_of(SURE)) == np.argmax(logits_of(SURE, seed=7)))


def test_audits_are_dropped_when_their_queue_is_full(tmp_path, edge, peer):
    peer.faults.hold = threading.Event()
    with serve_oip(peer) as url:
        r = make_router(
            tmp_path, edge, url, audit_rate=1.0, rand=lambda: 0.0, budget={"burst": 100}, background_queue=1
        )
        answers = [r.answer({"x": SURE}) for _ in range(3)]
        peer.faults.hold.set()
        assert r.wait_idle(10)
    assert all(a.answered_by == "edge" for a in answers)
    w = r.stats.drain()
    assert (w["audits"], w["audits_dropped"]) == (1, 2)


def test_audits_respect_the_budget(tmp_path, edge, peer):
    with serve_oip(peer) as url:
        r = make_router(
            tmp_path, edge, url, audit_rate=1.0, rand=lambda: 0.0, budget={"per_minute": 0, "burst": 1}
        )
        for _ in range(3):
            r.answer({"x": SURE})
            assert r.wait_idle(10)
    w = r.stats.drain()
    assert (w["audits"], w["audits_skipped"]) == (1, 2)
    assert peer.infer_count == 1


def test_hours_offline_every_request_answered_from_cache_or_edge(tmp_path, edge, peer):
    clock = Clock()
    seen = [UNSURE + i / 50 for i in range(5)]
    with serve_oip(peer) as url:
        r = make_router(
            tmp_path,
            edge,
            url,
            clock=clock,
            budget={"burst": 100, "per_minute": 600},
            breaker={"failures": 3, "open_s": 600},
            cache={"ttl_s": 86400},
        )
        for x in seen:
            assert r.answer({"x": x}).answered_by == "cloud"
        assert r.wait_idle(10)
    r.stats.drain()
    by = {"cache": 0, "edge": 0}
    for step in range(600):  # ten hours, a request a minute; the link never comes back
        clock.advance(60)
        x = seen[step % 5] if step % 2 == 0 else UNSURE - (step + 1) / 1000
        a = r.answer({"x": x})
        by[a.answered_by] += 1
        if step % 2 == 0:
            assert a.answered_by == "cache"  # a cached cloud answer beats the edge for the same input
            np.testing.assert_allclose(a.outputs["logits"], logits_of(x, seed=7), rtol=1e-5)
    assert by == {"cache": 300, "edge": 300}
    w = r.stats.drain()
    assert w["requests"] == 600
    assert w["escalations"] == 600  # all unsure: each wanted the cloud, none got it
    assert w["cloud"] == 0
    assert w["breaker_open"] + w["cloud_failed"] == 600
    assert w["breaker_open"] > w["cloud_failed"]  # the breaker spared most of the attempts


def test_the_cache_survives_a_restart(tmp_path, edge, peer):
    clock = Clock()
    with serve_oip(peer) as url:
        r = make_router(tmp_path, edge, url, clock=clock)
        assert r.answer({"x": UNSURE}).answered_by == "cloud"
        assert r.wait_idle(10)
        r.close()
    again = make_router(tmp_path, edge, url, clock=clock)  # the peer is gone
    a = again.answer({"x": UNSURE})
    assert (a.answered_by, a.reason) == ("cache", "cloud_failed:unreachable")


def test_split_inference_sends_only_the_embedding(tmp_path):
    edge_path, head_path = split_pair(tmp_path)
    peer = OipPeer([PeerModel("head", "1.0.0", head_path)])
    x = np.array([[0.01, -0.02, 0.03, 0.0]], np.float32)
    with serve_oip(peer) as url:
        r = make_router(
            tmp_path,
            session_edge(edge_path),
            url,
            cloud={
                "model": "head",
                "send": "emb",
                "inputs": {"emb": "features"},
                "outputs": {"logits": "probs"},
            },
        )
        a = r.answer({"x": x})
        assert r.wait_idle(10)
    edge_out = session_edge(edge_path)({"x": x})
    assert a.answered_by == "cloud"
    sent = peer.seen[-1]["body"]
    assert [i["name"] for i in sent["inputs"]] == ["features"]  # the raw input never left
    np.testing.assert_allclose(np.array(sent["inputs"][0]["data"]).reshape(1, -1), edge_out["emb"], rtol=1e-6)
    assert sent["outputs"] == [{"name": "probs"}]
    assert a.outputs["logits"].sum() == pytest.approx(1.0, rel=1e-5)  # the cloud head's probabilities
    np.testing.assert_array_equal(a.outputs["emb"], edge_out["emb"])
    assert r.stats.drain()["cloud_agreement"] == 1.0  # same head weights: same top-1
    # offline, the same embedding is answered from the cache, kept under the cloud's own names
    (cached,) = [r.cache.get(k) for k in [p.stem for p in (tmp_path / "cache").glob("*.ans")]]
    assert list(cached.outputs) == ["probs"]
    again = r.answer({"x": x})
    assert (again.answered_by, again.reason) == ("cache", "cloud_failed:unreachable")
    np.testing.assert_array_equal(again.outputs["logits"], a.outputs["logits"])


def test_concurrent_callers_are_each_answered_exactly_once(tmp_path, edge, peer):
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with serve_oip(peer) as url:
        r = make_router(
            tmp_path,
            edge,
            url,
            budget={"burst": 40, "per_minute": 0},
            audit_rate=0.3,
            rand=np.random.default_rng(0).random,
            cloud={"timeout_ms": 1000},
        )

        def caller(i: int) -> None:
            for j in range(12):
                if (i + j) % 5 == 0:
                    peer.faults.status = 500 if j % 2 else None
                x = SURE if j % 3 == 0 else UNSURE + (i * 12 + j) / 1000
                try:
                    a = r.answer({"x": x})
                except BaseException as exc:
                    errors.append(exc)
                    continue
                with lock:
                    results.append(a.answered_by)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert r.wait_idle(10)
    assert errors == []
    assert len(results) == 96
    w = r.stats.drain()
    assert w["requests"] == 96
    assert w["edge"] + w["cloud"] + w["cache"] == 96
    assert (w["edge"], w["cloud"], w["cache"]) == (
        results.count("edge"),
        results.count("cloud"),
        results.count("cache"),
    )


def fill_up(directory) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_under_the_cache_only_skips_the_write(tmp_path, edge, peer):
    with tiny_filesystem(tmp_path / "small", "64k") as small, serve_oip(peer) as url:
        fill_up(small)
        r = make_router(small, edge, url)
        a = r.answer({"x": UNSURE})
        assert r.wait_idle(10)
        assert a.answered_by == "cloud"
        assert r.stats.drain()["cache_write_skipped"] == 1
        assert r.cache.counters()["disk_full"] == 1


def test_build_router_from_the_device_settings(tmp_path, peer, make_slot):
    host = ModelHost("clf", warmup_runs=0)
    host.install(make_slot("1.0.0", scale=4.0))
    settings = DeviceSettings(data_dir=tmp_path / "dev", device_token="tok-9")
    # the edge model's output is "y", the cloud model's "logits"
    policy = parse_routing_policy(policy_doc(confidence={"output": "y"}, cloud={"outputs": {"y": "logits"}}))
    stats = RoutingStats()
    with serve_oip(peer) as url:
        env = RoutingEnvironment.from_device_settings(settings, fleet_url=url, insecure_http=True)
        r = build_router(policy, env, host_edge(host), model="clf", stats=stats)
        a = r.answer({"x": UNSURE})
        assert r.wait_idle(10)
        r.close()
    assert (a.answered_by, a.reason) == ("cloud", "escalated")
    assert peer.seen[-1]["headers"]["authorization"] == "Bearer tok-9"
    assert len(list((tmp_path / "dev" / CACHE_DIR / "clf").glob("*.ans"))) == 1
    assert stats.drain()["cloud"] == 1
    assert host.health.snapshot_and_reset().requests == 1  # the edge ran through the host


def test_build_router_without_a_usable_cloud_still_answers(tmp_path, edge):
    policy = parse_routing_policy(policy_doc())
    r = build_router(policy, RoutingEnvironment(data_dir=tmp_path), edge, model="clf")
    a = r.answer({"x": UNSURE})
    assert (a.answered_by, a.reason) == ("edge", "cloud_failed:unconfigured")
    assert "no fleet cloud URL" in r.status()["cloud_problem"]
    with pytest.raises(ValueError, match="not a model name"):
        build_router(policy, RoutingEnvironment(data_dir=tmp_path), edge, model="../etc")


def test_the_environment_takes_enrollment_credentials_unless_settings_override(tmp_path):
    identity = Identity(
        device_id="dev-1",
        server_url="https://fleet.example.com",
        mqtt_host="fleet.example.com",
        mqtt_port=8883,
        mqtt_tls=True,
        tuf_metadata_url="https://fleet.example.com/tuf/metadata/",
        tuf_targets_url="https://fleet.example.com/tuf/targets/",
        device_token="enrolled-token",
        data_dir=tmp_path,
    )
    env = RoutingEnvironment.from_device_settings(DeviceSettings(data_dir=tmp_path), identity)
    assert (env.device_token, env.client_cert, env.client_key, env.fleet_ca) == (
        "enrolled-token",
        identity.cert_file,
        identity.key_file,
        identity.ca_file,
    )
    assert env.secret_path("k") == tmp_path / "secrets" / "k"
    settings = DeviceSettings(data_dir=tmp_path, device_token="override", ca_cert=tmp_path / "other-ca.crt")
    env = RoutingEnvironment.from_device_settings(settings, identity, fleet_url="https://cloud.example.com")
    assert (env.device_token, env.fleet_ca, env.fleet_url) == (
        "override",
        tmp_path / "other-ca.crt",
        "https://cloud.example.com",
    )
