"""``fleet simulate``: enroll (or reuse) N simulated devices and run them until stopped."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from pathlib import Path

from device_client.console import make_console
from server.sim.fleet import SimOptions, Simulator
from server.sim.profiles import Profile, parse_profile
from server.sim.provision import enroll_fleet

console = make_console()


def simulate(
    n_devices: int,
    *,
    server_url: str | None,
    token: str | None,
    workdir: Path | None,
    processes: int = 0,
    prefix: str = "sim",
    tags: dict[str, str] | None = None,
    serving: dict[str, str] | None = None,
    profiles: list[str] | None = None,
    health_window_s: float = 10.0,
    duration_s: float = 0.0,
) -> int:
    default = Profile()
    by_version: dict[str, Profile] = {}
    for text in profiles or []:
        version, prof = parse_profile(text, default)
        if version == "*":
            default = prof
        else:
            by_version[version] = prof
    work = workdir or Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    embedded = None
    if server_url is None:
        # only without --server: the embedded server brings the app, SQLAlchemy and Mosquitto
        from server.sim.embedded import start_embedded

        embedded = start_embedded(work, n_devices)
        server_url, token = embedded.url, embedded.admin_token
        console.print(
            f"embedded server at [bold]{server_url}[/bold], Mosquitto on port "
            f"{embedded.settings.mqtt_port}; admin token:\n  {token}"
        )
    elif not token:
        raise SystemExit("--token (an operator or admin token) is needed to create the enrollment token")
    sim = None
    try:
        t = time.monotonic()
        fleet = enroll_fleet(server_url, token, n_devices, work / "identities", prefix=prefix, tags=tags)
        console.print(
            f"{len(fleet.devices)} device identities ready in {time.monotonic() - t:.1f} s ({work})"
        )
        opts = SimOptions(
            processes=processes,
            profiles=by_version,
            default_profile=default,
            serving=serving or {},
            health_window_s=health_window_s,
        )
        sim = Simulator(fleet, opts).start()
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        t0 = time.monotonic()
        while not stop.wait(2.0):
            s = sim.stats()
            console.print(
                f"[{time.monotonic() - t0:6.0f}s] connected {s.get('connected', 0)}/{n_devices}  "
                f"desired {s.get('desired_accepted', 0)}  succeeded {s.get('report_succeeded', 0)}  "
                f"failed {s.get('report_failed', 0)}  rolled back {s.get('report_rolled_back', 0)}  "
                f"health {s.get('health_sent', 0)}"
            )
            if duration_s and time.monotonic() - t0 >= duration_s:
                break
        return 0
    finally:
        if sim is not None:
            console.print(f"stopping: {sim.stop()}")
        if embedded is not None:
            embedded.stop()
