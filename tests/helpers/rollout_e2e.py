"""Helpers for rollout end-to-end tests (tests/integration/test_rollout_e2e.py): a small fleet of
real in-process device daemons enrolled against ``live_server``, live inference traffic through
their local APIs, and a rollout follower that records what it saw."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa

from device_client.daemon import Daemon
from device_client.enroll import enroll
from server.client import FleetClient
from tests.helpers.device_fleet import device_settings, outcome_for, wait_for

MODEL = "det"
TERMINAL = ("completed", "paused", "aborted", "rolled_back")


class Fleet:
    """``n`` devices enrolled with one multi-use token carrying ``tags``; daemons started on demand."""

    def __init__(
        self,
        live,
        root: Path,
        n: int,
        *,
        prefix: str = "edge",
        tags: dict[str, str] | None = None,
        **daemon_overrides: Any,
    ) -> None:
        self.live = live
        self.root = root
        self.tags = tags or {"site": "lab"}
        self.overrides = daemon_overrides
        self.client = FleetClient(live.url, live.token("admin"))
        token = self.client.create_enroll_token(self.tags, uses=n)["token"]
        self.ids = [f"{prefix}-{i:02d}" for i in range(n)]
        for device_id in self.ids:
            enroll(live.url, token, root / device_id, device_id=device_id, insecure_http=True)
        self.daemons: dict[str, Daemon] = {}

    def use_server(self, live) -> None:
        """Talk to a restarted server (same URL and database, new process state)."""
        self.live = live
        self.client.close()
        self.client = FleetClient(live.url, live.token("admin"))

    # -- daemons ---------------------------------------------------------------------------------
    def start(self, ids: Iterable[str] | None = None, wait_online: bool = True) -> None:
        ids = list(self.ids if ids is None else ids)
        for device_id in ids:
            self.daemons[device_id] = Daemon(device_settings(self.root / device_id, **self.overrides)).start()
        if wait_online:
            wait_for(
                lambda: all(self.device(d)["status"] == "online" for d in ids),
                timeout=30,
                interval=0.2,
                what=f"{ids} online",
            )

    def stop(self, ids: Iterable[str] | None = None, timeout: float = 40.0) -> None:
        """Stop daemons in parallel; a daemon that does not stop fails the test instead of hanging it."""
        ids = [d for d in (self.ids if ids is None else ids) if d in self.daemons]
        threads = {
            d: threading.Thread(target=self.daemons.pop(d).stop, name=f"stop-{d}", daemon=True) for d in ids
        }
        for t in threads.values():
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads.values():
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [d for d, t in threads.items() if t.is_alive()]
        assert not stuck, f"daemons did not stop within {timeout}s: {stuck}"

    def close(self) -> None:
        self.stop()
        self.client.close()

    def api(self, device_id: str) -> str:
        return self.daemons[device_id].api.url

    @property
    def running(self) -> list[str]:
        return [d for d in self.ids if d in self.daemons]

    # -- server views ----------------------------------------------------------------------------
    def device(self, device_id: str) -> dict[str, Any]:
        return self.client.get_device(device_id)

    def serving(self) -> dict[str, str | None]:
        """What the server believes each device serves."""
        return {d: self.device(d)["serving"].get(MODEL) for d in self.ids}

    def install(self, version: str, ids: Iterable[str] | None = None) -> None:
        """Directly assign ``version`` (outside any rollout) and wait until each device succeeded."""
        ids = list(self.running if ids is None else ids)
        quick = {"seconds": 0.3, "min_requests": 0}
        seqs = {d: self.client.assign_desired(d, MODEL, version, probation=quick)["seq"] for d in ids}
        for d, seq in seqs.items():
            out = outcome_for(self.live, d, seq, timeout=40)
            assert out["phase"] == "succeeded", out
        wait_for(
            lambda: all(self.device(d)["serving"].get(MODEL) == version for d in ids),
            timeout=20,
            interval=0.2,
            what=f"server sees {version} everywhere",
        )

    def deployments(self, rollout_id: str) -> dict[str, tuple[int, str, str | None]]:
        """device id -> (stage, phase, previous_version), straight from the database."""
        from server.rollouts.tables import Deployment

        with self.live.ctx.db.session_scope() as s:
            rows = s.execute(
                sa.select(
                    Deployment.device_id, Deployment.stage, Deployment.phase, Deployment.previous_version
                ).where(Deployment.rollout_id == rollout_id)
            )
            return {d: (stage, phase.value, prev) for d, stage, phase, prev in rows}

    def wait_health(self, version: str, ids: Iterable[str] | None = None, timeout: float = 20.0) -> None:
        """Until the server holds a health window with requests answered by ``version`` from each
        device (windows travel at QoS 0 every ``health_window_s``: answered requests alone do not
        mean the server has seen them yet)."""
        from server.health.tables import HealthSample

        ids = set(self.running if ids is None else ids)

        def reported() -> set[str]:
            with self.live.ctx.db.session_scope() as s:
                rows = s.execute(
                    sa.select(HealthSample.device_id)
                    .where(HealthSample.model == MODEL, HealthSample.version == version)
                    .where(HealthSample.requests > 0, HealthSample.device_id.in_(ids))
                    .distinct()
                )
                return {d for (d,) in rows}

        what = f"{version} health from {sorted(ids)}"
        wait_for(lambda: reported() == ids, timeout=timeout, interval=0.2, what=what)

    def desired_versions(self) -> dict[str, tuple[int, str, str]]:
        """device id -> (seq, version, mode) of the DesiredState the server holds for it."""
        from server.rollouts.tables import DesiredRecord

        with self.live.ctx.db.session_scope() as s:
            rows = s.execute(
                sa.select(
                    DesiredRecord.device_id, DesiredRecord.seq, DesiredRecord.version, DesiredRecord.mode
                )
            )
            return {d: (seq, v, m) for d, seq, v, m in rows}


class Traffic:
    """Live inference requests, round-robin over the fleet's running daemons, from one thread.

    ``negative_share`` of the requests carry a negative input element (NaN on a
    ``nan_on_negative`` model). ``answered_by[device][version]`` counts the
    ``X-Fleet-Model-Version`` of every 200 answer.
    """

    def __init__(
        self, fleet: Fleet, *, interval_s: float = 0.004, negative_share: float = 0.0, seed: int = 7
    ) -> None:
        self.fleet = fleet
        self.interval_s = interval_s
        self.negative_share = negative_share
        self.rng = np.random.default_rng(seed)
        self.answered_by: dict[str, Counter[str]] = defaultdict(Counter)
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def total(self, device_id: str) -> int:
        return sum(self.answered_by[device_id].values())

    def _run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.is_set():
                for device_id in self.fleet.running:
                    if self._stop.wait(self.interval_s):
                        return
                    daemon = self.fleet.daemons.get(device_id)
                    if daemon is None:
                        continue
                    x = self.rng.random((1, 4), dtype=np.float32)
                    if self.rng.random() < self.negative_share:
                        x[0, 0] = -0.5
                    try:
                        r = http.post(daemon.api.url + "/v1/infer", json={"inputs": {"x": x.tolist()}})
                    except httpx.HTTPError:
                        continue  # stopping or not serving yet
                    self.statuses[r.status_code] += 1
                    if r.status_code == 200:
                        self.answered_by[device_id][r.headers["x-fleet-model-version"]] += 1


def wait_requests(traffic: Traffic, ids: Iterable[str], n: int, timeout: float = 20.0) -> None:
    """Until every device in ``ids`` answered ``n`` more requests than now."""
    ids = list(ids)
    start = {d: traffic.total(d) for d in ids}
    wait_for(
        lambda: all(traffic.total(d) - start[d] >= n for d in ids),
        timeout=timeout,
        interval=0.1,
        what=f"{n} requests answered by each of {ids}",
    )


def rollout_body(version: str, stages: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "version": version,
        "selector": {"tags": {"site": "lab"}},
        "stages": stages,
        # p95 ratios are too noisy with a dozen daemons on two shared cores: latency is not gated here
        "gates": {"max_failure_ratio": 0.0, "max_error_rate": 0.05, "max_p95_ratio": None, "min_requests": 5},
        "probation": {"seconds": 0.5, "min_requests": 3, "max_error_rate": 0.2},
        "on_failure": "rollback",
        "device_timeout_s": 60,
    }
    for key, value in over.items():
        if key == "gates":
            body["gates"] = {**body["gates"], **value}
        else:
            body[key] = value
    return body


def follow(
    client: FleetClient,
    rollout_id: str,
    *,
    timeout: float = 40.0,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Poll ``GET /api/v1/rollouts/{id}`` until it stops (or ``until`` holds); every snapshot goes
    through ``on_snapshot`` first."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = client.get_rollout(rollout_id)
        if on_snapshot is not None:
            on_snapshot(state)
        if (until or (lambda s: s["status"] in TERMINAL))(state):
            return state
        time.sleep(0.1)
    raise AssertionError(
        f"rollout {rollout_id} still {state.get('status')} at stage {state.get('current_stage')} "
        f"after {timeout}s: {state.get('phases')} {state.get('reason')}"
    )
