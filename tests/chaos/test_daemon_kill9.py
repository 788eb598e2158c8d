"""kill -9 of a real device daemon at a seeded random point of an update.

One live server, one broker and one enrolled device serve every trial of the module. Each trial
pushes a new release, assigns it, and SIGKILLs the daemon process at a moment drawn from
``random.Random(seed)``: a target phase (before the device accepted the desired state,
downloading, verifying, installing, probation) and an offset into it, watched on the daemon's own
state file. The download is rate limited and probation lasts long enough for both to be hit.
Then the daemon is started again, and the trial asserts what the device state machine promises
(docs/architecture.md, "Device update"):

* the state file loads (``state.json`` or its ``.prev`` copy: never a fresh start);
* the local API comes up already serving a model: the old version or the new one, never nothing;
* exactly one outcome is reported for the desired state, and it is the one the crash recovery
  policy implies (``rolled_back`` after a crash in probation, ``succeeded`` otherwise);
* once recovery completes, no update is in flight, the state file, the local API, the server's view
  and the reported outcome all name the same serving version; no download, staging leftover or
  unacknowledged report remains, and every slot the state references is intact on disk.

The seed is in the test id (``seedN``): ``pytest 'tests/chaos/test_daemon_kill9.py::...[seedN]'``
replays one trial's kill moment (its timing still depends on the machine).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from device_client.state import OUTCOMES, UpdatePhase
from device_client.store import StateStore
from tests.helpers.chaos_rig import TERMINAL, Rig, peek_state, running_rig
from tests.helpers.device_fleet import (
    DaemonProcess,
    assign,
    enroll_device,
    events,
    infer,
    outcome_for,
    push_model,
    serving_version,
    wait_for,
)
from tests.helpers.onnx_models import make_model

pytestmark = pytest.mark.mqtt
log = logging.getLogger(__name__)

DEVICE = "edge-kill9"
MODEL = "clf"
TRIALS = 30
#: ~400 kB bundles at 800 kB/s: about 0.5 s of download to aim at, then 0.5 s of probation
RATE_BPS = 800_000
PROBATION = {"seconds": 0.5, "min_requests": 0}
DAEMON = {"download_rate_limit_bps": RATE_BPS, "probation_tick_s": 0.02}

#: where a kill can land, in update order; "notified": the desired state is published but the
#: device has not accepted it yet; "done": the update had finished before the kill
ORDER = ["notified", "downloading", "verifying", "installing", "probation", "done"]
#: (weight, longest offset into the phase in seconds) of each target phase
TARGETS = {
    "notified": (2, 0.15),
    "downloading": (3, 0.5),
    "verifying": (2, 0.01),
    "installing": (2, 0.01),
    "probation": (3, 0.5),
}


@dataclass
class KillRecord:
    target: str
    offset: float
    observed: str  # the phase last seen on the state file before the kill
    persisted: str  # the phase the surviving state file holds


class KillRig:
    """The device of the module: enrolled once; its daemon is killed and restarted by every trial."""

    def __init__(self, rig: Rig, root: Path) -> None:
        self.rig = rig
        self.root = root
        self.data = root / "device"
        self.releases = itertools.count(1)
        self.daemon: DaemonProcess | None = None
        self.restarts = 0
        enroll_device(rig.live, self.data, DEVICE)
        first = self.push_next()
        self.start()
        seq = assign(rig.live, DEVICE, MODEL, first, probation={"seconds": 0.1, "min_requests": 0})["seq"]
        assert outcome_for(rig.live, DEVICE, seq)["phase"] == "succeeded"
        wait_for(lambda: self.idle(seq), timeout=20, what="first install settled")

    def push_next(self) -> str:
        n = next(self.releases)
        version = f"{n}.0.0"
        onnx = make_model(self.root / f"m{n}.onnx", out_dim=20_000, scale=float(n), seed=n)
        push_model(self.rig.live, MODEL, version, onnx)
        return version

    def start(self) -> DaemonProcess:
        self.restarts += 1
        self.daemon = DaemonProcess(self.data, self.root / f"daemon-{self.restarts:03d}.log", **DAEMON)
        self.daemon.wait_api()
        return self.daemon

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()

    def idle(self, seq: int) -> bool:
        state = peek_state(self.data)
        return state is not None and state.update is None and state.last_desired_seq == seq

    def where(self, seq: int) -> str:
        """Where the update of desired state ``seq`` is, per the state file (None: unreadable now)."""
        state = peek_state(self.data)
        if state is None:
            return ""
        return phase_of(state, seq)

    def kill_at(self, seq: int, target: str, offset: float, issued: float) -> tuple[str, str]:
        """SIGKILL the daemon ``offset`` seconds into ``target`` (or at once once it is past it)."""
        assert self.daemon is not None
        observed = "notified"
        entered: float | None = issued if target == "notified" else None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = time.monotonic()
            seen = self.where(seq) or observed
            observed = seen
            if ORDER.index(seen) > ORDER.index(target):
                break
            if seen == target and entered is None:
                entered = now
            if entered is not None and now - entered >= offset:
                break
            time.sleep(0.001)
        else:
            raise AssertionError(f"the update never reached {target}: {self.daemon.log_tail()}")
        self.daemon.kill9()
        return observed, self.where(seq)


def phase_of(state, seq: int) -> str:
    if state.last_desired_seq < seq:
        return "notified"
    if state.update is None:
        return "done"
    if state.update.phase in OUTCOMES:
        return "done"
    return state.update.phase.value


@pytest.fixture(scope="module")
def kill_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KillRig]:
    root = tmp_path_factory.mktemp("kill9")
    with running_rig(root) as rig:
        device = KillRig(rig, root)
        try:
            yield device
        finally:
            device.stop()
            log.info("kill points: %s", KILLS)


KILLS: dict[int, KillRecord] = {}


def expected_outcome(persisted: str) -> str:
    """What the crash recovery policy (device_client.state.recovery_action) must report."""
    return "rolled_back" if persisted == "probation" else "succeeded"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(TRIALS), ids=lambda s: f"seed{s}")
def test_kill9_at_a_random_point_of_an_update_recovers(kill_rig: KillRig, seed: int) -> None:
    rig = kill_rig
    live = rig.rig.live
    rng = random.Random(seed)
    names = list(TARGETS)
    target = rng.choices(names, weights=[TARGETS[n][0] for n in names])[0]
    offset = rng.uniform(0, TARGETS[target][1])

    if rig.daemon is None or not rig.daemon.alive:  # a previous trial failed half-way
        rig.start()
    before = StateStore(rig.data).load().state
    assert before.update is None, before.update
    old = before.current[MODEL].version
    assert serving_version(rig.daemon.url) == old
    new = rig.push_next()

    seq = assign(live, DEVICE, MODEL, new, probation=PROBATION)["seq"]
    observed, persisted = rig.kill_at(seq, target, offset, time.monotonic())

    # the state survived the kill: the primary file or its previous copy, never a fresh start
    loaded = StateStore(rig.data).load()
    assert loaded.source in ("primary", "previous"), loaded.problems
    persisted = phase_of(loaded.state, seq)
    KILLS[seed] = KillRecord(target, round(offset, 4), observed, persisted)
    log.info("seed %d: %s", seed, KILLS[seed])

    daemon = rig.start()
    # the API is up only once a model is loaded: the old or the new one, never nothing
    first = serving_version(daemon.url)
    assert first in (old, new), first

    out = outcome_for(live, DEVICE, seq, timeout=30)
    want = expected_outcome(persisted)
    assert out["phase"] == want, (KILLS[seed], out, daemon.log_tail())
    if want == "rolled_back":
        assert out["reason"] == "crashed during probation"
    serving = new if want == "succeeded" else old

    # recovery completes: nothing in flight, every report acknowledged, downloads cleaned up
    wait_for(lambda: rig.idle(seq), timeout=20, what="no update in flight")
    wait_for(lambda: not list((rig.data / "outbox").glob("*.json")), timeout=20, what="reports acked")
    state = peek_state(rig.data)
    assert state is not None
    assert state.phase is UpdatePhase.idle
    assert state.current[MODEL].version == serving
    for slot in (*state.current.values(), *state.previous.values()):
        assert (rig.data / slot.path / "bundle.json").is_file(), slot
    assert list((rig.data / "downloads").iterdir()) == []
    assert list((rig.data / "staging").iterdir()) == []
    if want == "succeeded":
        assert state.release_floor[MODEL] == int(new.split(".")[0])
        assert state.previous[MODEL].version == old
    else:
        assert state.release_floor[MODEL] == int(old.split(".")[0])

    # the model that serves is the one the outcome names, and it answers
    status, body = infer(daemon.url, np.ones((1, 4), np.float32))
    assert (status, body["version"]) == (200, serving), body
    assert serving_version(daemon.url) == serving

    # the server heard one outcome, last, after phases in update order (a phase may repeat when
    # verification restarts after a crash, but the update never goes backwards)
    mine = [e for e in events(live, DEVICE) if e["desired_seq"] == seq]
    phases = [e["phase"] for e in mine]
    assert [p for p in phases if p in TERMINAL] == [want], phases
    assert phases[-1] == want, phases
    ranks = [ORDER.index(p) if p in ORDER else len(ORDER) for p in phases]
    assert ranks == sorted(ranks), phases
    viewer = {"Authorization": f"Bearer {rig.rig.token('viewer')}"}

    def server_serving() -> str | None:
        r = httpx.get(f"{rig.rig.url}/api/v1/devices/{DEVICE}", headers=viewer, timeout=10)
        r.raise_for_status()
        return r.json()["serving"].get(MODEL)

    wait_for(lambda: server_serving() == serving, timeout=20, what="the server sees the serving version")
