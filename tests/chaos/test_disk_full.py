"""A full disk on the device fails the update cleanly.

The device's data directory lives on a real 2 MiB tmpfs (``mount -t tmpfs``; skipped where mounting
is not permitted). The pre-flight space check passes (the bundle fits when the download starts);
then another process fills the file system mid-download, so the daemon's next write gets a REAL
``ENOSPC``. The update must end ``failed`` with a ``disk_full`` reason reported to the server, the
state file must stay intact (it loads from ``state.json`` and names the old model), and the old
model must keep serving. Once space is available again, the next update installs.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from device_client.daemon import Daemon
from device_client.store import StateStore
from tests.helpers.chaos_rig import running_rig
from tests.helpers.device_fleet import (
    assign,
    device_settings,
    enroll_device,
    infer,
    outcome_for,
    push_model,
    serving_version,
    wait_for,
)
from tests.helpers.fs import tiny_filesystem
from tests.helpers.onnx_models import make_model

pytestmark = pytest.mark.mqtt

QUICK = {"seconds": 0.2, "min_requests": 0}


def fill(directory: Path) -> Path:
    """Write a file until the file system refuses with ENOSPC (what another process might do)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def test_disk_filling_up_mid_download_fails_the_update_cleanly(tmp_path: Path) -> None:
    with running_rig(tmp_path / "rig") as rig, tiny_filesystem(tmp_path / "devfs") as fs:
        live = rig.live
        data = fs / "device"
        enroll_device(live, data, "edge-full")
        for n in (1, 2, 3):  # ~400 kB bundles: two of them and an extraction fit in 2 MiB
            push_model(live, "clf", f"{n}.0.0", make_model(tmp_path / f"m{n}.onnx", out_dim=20_000, seed=n))
        daemon = Daemon(device_settings(data, download_rate_limit_bps=200_000)).start()
        try:
            seq1 = assign(live, "edge-full", "clf", "1.0.0", probation=QUICK)["seq"]
            assert outcome_for(live, "edge-full", seq1)["phase"] == "succeeded"

            seq2 = assign(live, "edge-full", "clf", "2.0.0", probation=QUICK)["seq"]
            partial = data / "downloads"
            wait_for(
                lambda: any(p.stat().st_size > 50_000 for p in partial.glob("*.partial")),
                timeout=30,
                what="the download under way",
            )
            filler = fill(fs)

            out = outcome_for(live, "edge-full", seq2, timeout=30)
            assert out["phase"] == "failed", out
            assert out["reason"].startswith("disk_full"), out["reason"]
            # the old model kept serving throughout, and still does
            assert serving_version(daemon.api.url) == "1.0.0"
            status, body = infer(daemon.api.url, np.ones((1, 4), np.float32))
            assert (status, body["version"]) == (200, "1.0.0")
            # the state file is intact and names the old model, nothing in flight
            wait_for(lambda: daemon.state.update is None, timeout=10, what="update finished")
            loaded = StateStore(data).load()
            assert loaded.source == "primary", loaded.problems
            assert loaded.state.update is None
            assert loaded.state.last_desired_seq == seq2
            assert loaded.state.current["clf"].version == "1.0.0"
            assert not list(partial.glob("*.partial"))

            # space again: the next desired state installs
            filler.unlink()
            seq3 = assign(live, "edge-full", "clf", "3.0.0", probation=QUICK)["seq"]
            assert outcome_for(live, "edge-full", seq3, timeout=30)["phase"] == "succeeded"
            assert serving_version(daemon.api.url) == "3.0.0"
        finally:
            daemon.stop()
