"""The on-disk cache of cloud answers: keys, TTL, byte cap with LRU eviction, restarts, corrupted
files, leftovers of a crash, and a genuinely full disk (a tiny tmpfs)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from device_client.routing.cache import AnswerCache, PutResult, cache_key, tensor_digest
from tests.helpers.fs import tiny_filesystem


class Clock:
    def __init__(self) -> None:
        self.t = 1_900_000_000.0

    def __call__(self) -> float:
        return self.t


X = {"x": np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)}
ANSWER = {"logits": np.array([[1.0, 2.0, 3.0]], np.float32), "label": np.array([2], np.int64)}


def make(tmp_path, clock=None, **kw) -> AnswerCache:
    kw.setdefault("max_bytes", 1 << 20)
    kw.setdefault("ttl_s", 3600)
    return AnswerCache(tmp_path / "cache", clock=clock or Clock(), **kw)


def put(cache: AnswerCache, key: str, outputs=ANSWER) -> PutResult:
    return cache.put(key, outputs, model="big", version="1.0.0", model_version="1.0.0")


def test_keys_cover_model_version_and_the_exact_bytes():
    k = cache_key("big", "1.0.0", X)
    assert k == cache_key("big", "1.0.0", {"x": X["x"].copy()})
    assert k != cache_key("big", "1.0.1", X)
    assert k != cache_key("big", None, X)
    assert k != cache_key("other", "1.0.0", X)
    assert k != cache_key("big", "1.0.0", {"x": X["x"].astype(np.float64)})  # same values, other dtype
    assert k != cache_key("big", "1.0.0", {"x": X["x"].reshape(2, 2)})  # same bytes, other shape
    assert k != cache_key("big", "1.0.0", {"y": X["x"]})  # other name
    bumped = X["x"].copy()
    bumped[0, 0] = np.nextafter(bumped[0, 0], np.float32(1))
    assert k != cache_key("big", "1.0.0", {"x": bumped})
    # a non-contiguous view hashes like its contiguous copy
    wide = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert tensor_digest({"x": wide[:, ::2]}) == tensor_digest({"x": np.ascontiguousarray(wide[:, ::2])})
    with pytest.raises(ValueError, match="no stable bytes"):  # objects would hash by their address
        tensor_digest({"x": np.array([object()])})


def test_put_get_round_trip_and_survives_a_restart(tmp_path):
    clock = Clock()
    cache = make(tmp_path, clock)
    key = cache_key("big", "1.0.0", X)
    assert cache.get(key) is None
    assert put(cache, key) is PutResult.stored
    hit = cache.get(key)
    assert hit is not None
    assert hit.model_version == "1.0.0"
    for name, arr in ANSWER.items():
        assert hit.outputs[name].dtype == arr.dtype
        np.testing.assert_array_equal(hit.outputs[name], arr)
    again = make(tmp_path, clock)
    assert len(again) == 1
    np.testing.assert_array_equal(again.get(key).outputs["logits"], ANSWER["logits"])
    assert again.counters()["hits"] == 1


def test_entries_expire_after_their_ttl_also_across_restarts(tmp_path):
    clock = Clock()
    cache = make(tmp_path, clock, ttl_s=60)
    key = cache_key("big", None, X)
    put(cache, key)
    clock.t += 59
    assert cache.get(key) is not None
    clock.t += 2
    assert cache.get(key) is None
    assert cache.counters()["expired"] == 1
    assert not any((tmp_path / "cache").iterdir())
    put(cache, key)
    clock.t += 61
    assert len(make(tmp_path, clock, ttl_s=60)) == 0  # an expired file is not loaded at start


def test_the_byte_cap_evicts_the_least_recently_used(tmp_path):
    clock = Clock()
    keys = [cache_key("big", None, {"x": np.full((1, 4), i, np.float32)}) for i in range(4)]
    probe = make(tmp_path / "probe", clock)
    put(probe, keys[0])
    entry = probe.total_bytes
    cache = make(tmp_path, clock, max_bytes=3 * entry)
    for k in keys[:3]:
        clock.t += 1
        assert put(cache, k) is PutResult.stored
    assert cache.get(keys[0]) is not None  # now the most recently used
    clock.t += 1
    put(cache, keys[3])
    assert cache.get(keys[1]) is None  # evicted
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.total_bytes <= 3 * entry
    assert cache.counters()["evicted"] == 1
    assert len(list((tmp_path / "cache").glob("*.ans"))) == 3
    # a smaller cap at restart evicts the oldest files first
    smaller = make(tmp_path, clock, max_bytes=entry)
    assert len(smaller) == 1
    assert smaller.get(keys[3]) is not None


def test_an_answer_larger_than_the_cap_is_not_stored(tmp_path):
    cache = make(tmp_path, max_bytes=100)
    big = {"y": np.zeros((100, 100), np.float32)}
    assert cache.put("a" * 64, big, model="m", version=None, model_version=None) is PutResult.too_large
    assert len(cache) == 0


def test_disabled_by_a_zero_cap_or_ttl(tmp_path):
    for kw in ({"max_bytes": 0}, {"ttl_s": 0}):
        cache = make(tmp_path, **kw)
        assert not cache.enabled
        assert put(cache, "b" * 64) is PutResult.disabled
        assert cache.get("b" * 64) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]),  # one flipped byte in the data
        lambda b: b"garbage",
        lambda b: b"",
        lambda b: b.replace(b"fleetota-answer/1", b"fleetota-answer/9"),
    ],
)
def test_a_corrupted_file_is_a_miss_and_is_rebuilt(tmp_path, damage):
    clock = Clock()
    cache = make(tmp_path, clock)
    key = cache_key("big", None, X)
    put(cache, key)
    path = tmp_path / "cache" / f"{key}.ans"
    path.write_bytes(damage(path.read_bytes()))
    os.utime(path, (clock.t, clock.t))  # bit rot leaves the time stamp alone
    restarted = make(tmp_path, clock)
    assert restarted.get(key) is None
    assert restarted.counters()["corrupted"] == 1
    assert not path.exists()
    assert put(restarted, key) is PutResult.stored
    np.testing.assert_array_equal(restarted.get(key).outputs["logits"], ANSWER["logits"])


def test_an_entry_copied_under_another_key_is_refused(tmp_path):
    clock = Clock()
    cache = make(tmp_path, clock)
    k1, k2 = cache_key("big", None, X), cache_key("big", None, {"x": np.zeros((1, 4), np.float32)})
    put(cache, k1)
    (tmp_path / "cache" / f"{k2}.ans").write_bytes((tmp_path / "cache" / f"{k1}.ans").read_bytes())
    os.utime(tmp_path / "cache" / f"{k2}.ans", (clock.t, clock.t))
    restarted = make(tmp_path, clock)
    assert restarted.get(k2) is None
    assert restarted.counters()["corrupted"] == 1
    assert restarted.get(k1) is not None


def test_leftovers_and_strangers_in_the_directory(tmp_path):
    clock = Clock()
    cache = make(tmp_path, clock)
    key = cache_key("big", None, X)
    put(cache, key)
    d = tmp_path / "cache"
    (d / f".{key}.ans.1a2b3c.tmp").write_bytes(b"half a write")
    (d / "notes.txt").write_text("not ours")
    os.symlink("/etc/passwd", d / f"{'c' * 64}.ans")
    restarted = make(tmp_path, clock)
    assert len(restarted) == 1
    assert not list(d.glob(".*.tmp"))
    assert (d / "notes.txt").exists()
    assert restarted.get("c" * 64) is None


def test_a_cache_directory_that_cannot_be_made_disables_the_cache(tmp_path):
    (tmp_path / "cache").write_text("a file where the directory should be")
    cache = make(tmp_path)
    assert not cache.enabled
    assert put(cache, "d" * 64) is PutResult.disabled


def test_a_full_disk_skips_writes_and_keeps_serving(tmp_path):
    with tiny_filesystem(tmp_path / "small", "64k") as small:
        cache = AnswerCache(small / "cache", max_bytes=1 << 30, ttl_s=3600, clock=Clock())
        first = cache_key("big", None, X)
        assert put(cache, first) is PutResult.stored
        big = {"y": np.random.default_rng(0).standard_normal((1, 4096)).astype(np.float32)}  # 16 KiB
        results = [
            cache.put(
                cache_key("big", None, {"x": np.full((1, 4), i, np.float32)}),
                big,
                model="big",
                version=None,
                model_version=None,
            )
            for i in range(8)
        ]
        assert PutResult.disk_full in results
        assert cache.counters()["disk_full"] == results.count(PutResult.disk_full)
        assert cache.get(first) is not None  # what is stored still serves
        assert not list((small / "cache").glob(".*.tmp"))  # no half-written temp file stays
