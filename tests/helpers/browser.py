"""Headless Debian chromium under Playwright for the dashboard's browser tests (no browser
download: ``executable_path`` is the system's chromium); ``chromium_or_skip`` says plainly why a
test cannot run."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("FLEET_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def chromium_or_skip() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM}: run 'apt-get install chromium' (make test does, as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    return CHROMIUM


class FleetPump:
    """Steps a simulated fleet in the background (devices act on new DesiredStates and report
    health) while a real engine thread drives the rollout."""

    def __init__(self, fleet, every_s: float = 0.3) -> None:
        self.fleet = fleet
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-pump", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.fleet.step()
            self.fleet.health()

    def __enter__(self) -> FleetPump:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
