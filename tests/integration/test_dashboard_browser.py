"""The dashboard in a real headless chromium (Playwright) against a live server whose engine
drives a rollout over a simulated fleet: sign in, watch the rollout advance without a reload, see
the health charts' points (the hybrid routing ones too: the rollout carries a routing policy),
pause and resume it from the page, sign out. Takes the screenshots the README shows (written to
docs/screenshots/ with FLEET_UPDATE_SCREENSHOTS=1, else to the test's tmp dir). A viewer watches
an automatic rollback appear with its reason, has no buttons, and a POST forged from the page is
refused. An operator starts a rollout from the form with "pause for approval" and approves its
second stage from the page."""

from __future__ import annotations

import re

import httpx
import pytest

from server.mqtt.broker import free_port
from tests.helpers.browser import (
    ARGS,
    WAIT_MS,
    FleetPump,
    assert_screenshot,
    chromium_or_skip,
    screenshot_dir,
    sign_in,
)
from tests.helpers.fleet_sim import Behaviour
from tests.helpers.live_server import LiveServer
from tests.helpers.rollout_lab import make_lab, rollout_body

#: the lab's det model asks the cloud model det-cloud when unsure
ROUTING = {
    "mode": "prefer_edge",
    "confidence": {"output": "y", "kind": "max_prob", "softmax": True, "threshold": 0.6},
    "cloud": {"endpoint": "fleet", "model": "det-cloud", "timeout_ms": 500},
}
#: how devices under that policy behave: 20% escalated, 90% of those answered alike by the cloud
HYBRID = Behaviour(escalation_rate=0.2, cloud_agreement=0.9)


@pytest.fixture
def dashboard_server(settings):
    if "sqlite" not in settings.database_url:
        pytest.skip("one backend is enough for the browser")
    port = free_port()
    live = settings.model_copy(update={
        "port": port, "public_url": f"http://127.0.0.1:{port}", "rollout_engine": True, "rollout_tick_s": 0.2,
    })  # fmt: skip
    server = LiveServer(live).start()
    yield server
    server.stop()


def test_watch_pause_and_resume_a_rollout_in_the_browser(dashboard_server, onnx_model, tmp_path):
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)

    server = dashboard_server
    headers = {"Authorization": f"Bearer {server.token('admin')}"}
    with httpx.Client(base_url=server.url, timeout=30) as api:
        fleet = make_lab(api, headers, server.ctx, onnx_model)
        with open(onnx_model("cloud.onnx", seed=7), "rb") as fh:
            upload = {"file": ("m.onnx", fh, "application/octet-stream")}
            r = api.post("/api/v1/models/det-cloud/versions", data={"version": "1.0.0"}, files=upload,
                         headers=headers)  # fmt: skip
        assert r.status_code == 201, r.text
        fleet.by_policy = lambda version, routing: HYBRID if routing else None
        stages = [{"percent": 10, "soak_s": 4}, {"percent": 50, "soak_s": 4}, {"percent": 100, "soak_s": 4}]
        body = rollout_body(
            "2.0.0", stages=stages, on_failure="pause", probation={"seconds": 0.3}, routing=ROUTING
        )
        shots = screenshot_dir(tmp_path)
        r = api.post("/api/v1/rollouts", json=body, headers=headers)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        with FleetPump(fleet), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(chromium), args=ARGS, headless=True)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("dialog", lambda dialog: dialog.accept())

            page.goto(f"{server.url}/ui/rollouts/{rid}")
            assert "/ui/login" in page.url  # signed out: the login page
            page.fill("#token", server.token("operator"))
            page.click("#signin")
            page.wait_for_url(f"**/ui/rollouts/{rid}")
            assert context.cookies()[0]["httpOnly"]
            page.evaluate("window.notReloaded = true")

            # the live partial advances the stage by itself
            expect(page.locator("#status")).to_have_text("running")
            expect(page.locator("#stage")).not_to_have_text("1")
            assert page.evaluate("window.notReloaded === true")

            page.click("#act-pause")
            expect(page.locator("#status")).to_have_text("paused", timeout=WAIT_MS)
            state = api.get(f"/api/v1/rollouts/{rid}", headers=headers).json()
            assert state["status"] == "paused"
            assert state["reason"] == "paused by operator"
            expect(page.locator("#act-resume")).to_be_visible()

            # the overview in a second tab of the same sign-in, while the rollout waits paused
            tab = context.new_page()
            tab.goto(f"{server.url}/ui/")
            expect(tab.locator("#active-rollouts")).to_contain_text(rid)
            expect(tab.locator("#by-status")).to_contain_text("online")
            tab.screenshot(path=str(shots / "overview.png"), full_page=True)
            tab.close()

            page.click("#act-resume")
            expect(page.locator("#act-pause")).to_be_visible()  # the action's redirect has loaded
            page.evaluate("window.notReloaded = true")
            expect(page.locator("#status")).to_have_text("completed", timeout=WAIT_MS)
            assert page.evaluate("window.notReloaded === true")
            assert api.get(f"/api/v1/rollouts/{rid}", headers=headers).json()["status"] == "completed"

            # the chart has points of the new version and of the baseline
            chart = page.locator("[data-metric=error_rate]")
            expect(chart).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d+)$"))
            legend = chart.locator(".u-legend").inner_text()
            assert "2.0.0" in legend
            assert "1.0.0 baseline" in legend
            # the routing policy's escalation rate and cloud agreement, charted once they arrive
            for metric in ("escalation_rate", "cloud_agreement"):
                hybrid = page.locator(f"[data-metric={metric}]")
                expect(hybrid).to_be_visible()
                expect(hybrid).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d+)$"))
                assert "2.0.0" in hybrid.locator(".u-legend").inner_text()
            health = api.get(f"/api/v1/rollouts/{rid}/health", headers=headers).json()
            new = next(s for s in health["series"] if s["version"] == "2.0.0")
            rates = {p["escalation_rate"] for p in new["points"] if p["routed_requests"]}
            assert rates
            assert all(r == pytest.approx(0.2) for r in rates)
            page.screenshot(path=str(shots / "rollout.png"), full_page=True)
            for name in ("overview.png", "rollout.png"):
                assert_screenshot(shots / name)

            # a device page charts its own health
            page.goto(f"{server.url}/ui/devices/lab-00")
            device_chart = page.locator("[data-metric=p95_ms]")
            expect(device_chart).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d+)$"))
            assert "2.0.0" in device_chart.locator(".u-legend").inner_text()
            expect(page.locator("[data-metric=escalation_rate]")).to_have_attribute(
                "data-points", re.compile(r"^([1-9]|\d\d+)$")
            )

            page.click("#logout")
            page.wait_for_url("**/ui/login**")
            page.goto(f"{server.url}/ui/")
            assert "/ui/login" in page.url
            browser.close()


def test_viewer_watches_an_automatic_rollback_and_cannot_act(dashboard_server, onnx_model):
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    server = dashboard_server
    headers = {"Authorization": f"Bearer {server.token('admin')}"}
    with httpx.Client(base_url=server.url, timeout=30) as api:
        bad = {"2.0.0": Behaviour(error_rate=0.3)}
        fleet = make_lab(api, headers, server.ctx, onnx_model, behaviours=bad)
        stages = [{"percent": 10, "soak_s": 3}, {"percent": 100, "soak_s": 3}]
        body = rollout_body("2.0.0", stages=stages, on_failure="rollback", probation={"seconds": 0.3})
        r = api.post("/api/v1/rollouts", json=body, headers=headers)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        with FleetPump(fleet), sync_playwright() as pw:
            browser, page = sign_in(pw, chromium, server.url, server.token("viewer"))
            page.goto(f"{server.url}/ui/rollouts/{rid}")
            expect(page.locator("#status")).to_have_text("running")
            assert page.locator("#actions").count() == 0  # a viewer has no buttons
            page.evaluate("window.notReloaded = true")

            # the canary's 30% errors trip the gate: the rollback and its reason appear by themselves
            expect(page.locator("#status")).to_have_text(re.compile("rolling_back|rolled_back"))
            expect(page.locator("#reason")).to_contain_text("stage 1 gates failed: error rate")
            assert page.evaluate("window.notReloaded === true")

            # a POST forged from the page (a viewer's cookie, no CSRF token) is refused
            status = page.evaluate(
                f"fetch('/ui/rollouts/{rid}/resume', {{method: 'POST'}}).then(r => r.status)"
            )
            assert status == 403
            forged = page.evaluate(
                f"""fetch('/ui/rollouts/{rid}/abort', {{method: 'POST',
                    headers: {{'Content-Type': 'application/x-www-form-urlencoded'}},
                    body: 'csrf=' + '0'.repeat(64)}}).then(r => r.status)"""
            )
            assert forged == 403
            assert api.get(f"/api/v1/rollouts/{rid}", headers=headers).json()["status"] in (
                "rolling_back", "rolled_back",
            )  # fmt: skip
            browser.close()


def test_start_a_rollout_with_approval_from_the_form_and_approve_it(dashboard_server, onnx_model):
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    server = dashboard_server
    headers = {"Authorization": f"Bearer {server.token('admin')}"}
    with httpx.Client(base_url=server.url, timeout=30) as api:
        fleet = make_lab(api, headers, server.ctx, onnx_model)
        with FleetPump(fleet), sync_playwright() as pw:
            browser, page = sign_in(pw, chromium, server.url, server.token("operator"), "/ui/rollouts/new")
            page.fill("input[name=model]", "det")
            page.fill("input[name=version]", "2.0.0")
            page.fill("input[name=tags]", "site:lab")
            stages = '[{"percent": 20, "soak_s": 2}, {"percent": 100, "soak_s": 2}]'
            page.fill("textarea[name=stages]", stages)
            page.fill("textarea[name=gates]", '{"max_failure_ratio": 0.2, "max_error_rate": 0.05}')
            page.check("#pause-between")
            page.click("#start")
            page.wait_for_url(re.compile(r"/ui/rollouts/(?!new$)[^/?]+$"))
            rid = page.url.rsplit("/", 1)[1]
            state = api.get(f"/api/v1/rollouts/{rid}", headers=headers).json()
            assert [s["pause_after"] for s in state["stages"]] == [True, False]

            # stage 1 passes and the rollout waits: the live part turns resume into the approval
            expect(page.locator("#act-resume")).to_have_text("Approve stage 2")
            expect(page.locator("#reason")).to_contain_text("waits for approval to start stage 2")
            expect(page.locator("#status")).to_have_text("paused")
            assert api.get(f"/api/v1/rollouts/{rid}", headers=headers).json()["phases"] == {
                "succeeded": 2, "pending": 8,
            }  # fmt: skip
            page.click("#act-resume")
            expect(page.locator("#status")).to_have_text("completed")
            final = api.get(f"/api/v1/rollouts/{rid}", headers=headers).json()
            assert (final["status"], final["phases"]) == ("completed", {"succeeded": 10})
            assert page.locator("#act-resume").count() == 0
            browser.close()
