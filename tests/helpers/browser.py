"""Headless Debian chromium under Playwright for the dashboard's browser tests (no browser
download: ``executable_path`` is the system's chromium); ``chromium_or_skip`` says plainly why a
test cannot run; where the screenshots go (``docs/screenshots`` only with
``FLEET_UPDATE_SCREENSHOTS=1``) and a check that one is a real picture."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("FLEET_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
#: how long a browser test waits for the page to show something (the rollout engine is real)
WAIT_MS = 60_000
#: the README's screenshots, rewritten by the browser test only with FLEET_UPDATE_SCREENSHOTS=1
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def screenshot_dir(tmp_path: Path) -> Path:
    """``docs/screenshots`` with ``FLEET_UPDATE_SCREENSHOTS=1``, else ``tmp_path`` (the checkout
    stays clean)."""
    out = SCREENSHOTS if os.environ.get("FLEET_UPDATE_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


def assert_screenshot(path: Path, min_width: int = 800, min_height: int = 400) -> None:
    """``path`` is a PNG of at least ``min_width`` x ``min_height`` pixels with more than a blank
    page's bytes."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert width >= min_width, (path, width, height)
    assert height >= min_height, (path, width, height)
    assert len(data) > 20_000, f"{path}: {len(data)} bytes, a blank page?"


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


def sign_in(pw, chromium: Path, base_url: str, token: str, next_path: str = "/ui/"):
    """A headless browser signed in to the dashboard with ``token`` through its login form, on
    ``next_path``; returns (browser, page). Confirmation dialogs are accepted."""
    browser = pw.chromium.launch(executable_path=str(chromium), args=ARGS, headless=True)
    page = browser.new_context().new_page()
    page.set_default_timeout(WAIT_MS)
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(f"{base_url}/ui/login?next={next_path}")
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_url(f"**{next_path}")
    return browser, page
