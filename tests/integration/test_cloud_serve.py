"""`fleet cloud serve` as a process of its own against a real server: Triton's official HTTP client
(``tritonclient``) gets correct answers from it, and a new version is picked up, and a revoked one
dropped, while requests keep flowing and none of them fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from server.cli import main
from server.mqtt.broker import free_port
from tests.helpers.cloud import Fleet, infer_body, reference, start_fleet, wait_for
from tests.helpers.onnx_models import make_model


@pytest.fixture
def fleet(settings, tmp_path) -> Iterator[Fleet]:
    f = start_fleet(settings)
    f.push("clf", "1.0.0", make_model(tmp_path / "m1.onnx", seed=1))
    yield f
    f.close()


class CloudProcess:
    """`fleet cloud serve` in a child process, configured through FLEET_* variables only."""

    def __init__(self, fleet: Fleet, models: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        s = fleet.settings
        env = {
            **os.environ,
            "FLEET_DATA_DIR": str(s.data_dir),  # the TUF root comes from the repository under it
            "FLEET_DATABASE_URL": s.database_url,
            "FLEET_CLOUD_SERVER_URL": s.public_url,
            "FLEET_CLOUD_TOKEN": fleet.cloud_token(),
            "FLEET_CLOUD_REFRESH_S": "0.3",
            "FLEET_CLOUD_AUTH_CACHE_S": "0",
            "FLEET_CLOUD_RATE_PER_S": "0",  # the load below is far over the default rate
        }
        self.log = log.open("wb")
        cmd = [
            sys.executable,
            "-m",
            "server.cli",
            "cloud",
            "serve",
            "--port",
            str(self.port),
            "--models",
            models,
        ]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, "fleet cloud serve exited"
            try:
                return httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, "fleet cloud serve to be ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def cloud_process(fleet, tmp_path) -> Iterator[CloudProcess]:
    proc = CloudProcess(fleet, "clf", tmp_path / "cloud.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
    # a graceful stop: uvicorn finishes its shutdown, then re-raises SIGTERM
    log = (tmp_path / "cloud.log").read_text()
    assert proc.proc.returncode in (0, -signal.SIGTERM), log[-3000:]
    assert "Application shutdown complete" in log


def test_tritonclient_gets_correct_answers(fleet, cloud_process):
    import tritonclient.http as triton

    device = fleet.enroll("dev-1")
    client = triton.InferenceServerClient(cloud_process.url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("clf", headers=device.headers())
        assert client.is_model_ready("clf", "1.0.0", headers=device.headers())
        assert not client.is_model_ready("unknown", headers=device.headers())
        meta = client.get_model_metadata("clf", headers=device.headers())
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
        x = np.random.default_rng(5).random((3, 4), dtype=np.float32)
        want = reference(fleet.models[("clf", "1.0.0")], x)
        for binary in (True, False):  # the binary tensor extension (tritonclient's default) and JSON
            tensor = triton.InferInput("x", [3, 4], "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            out = triton.InferRequestedOutput("y", binary_data=binary)
            result = client.infer("clf", [tensor], outputs=[out], headers=device.headers(), request_id="r-1")
            np.testing.assert_array_equal(result.as_numpy("y"), want)
            response = result.get_response()
            assert (response["model_name"], response["model_version"], response["id"]) == (
                "clf",
                "1.0.0",
                "r-1",
            )
        with pytest.raises(triton.InferenceServerException, match="401"):
            client.infer("clf", [tensor])  # no device token
    finally:
        client.close()


def test_new_version_swapped_in_and_revoked_one_dropped_without_failed_requests(
    fleet, cloud_process, tmp_path
):
    device = fleet.enroll("dev-1")
    x = np.random.default_rng(9).random((2, 4), dtype=np.float32)
    m2 = make_model(tmp_path / "m2.onnx", seed=2, bias=0.5)
    answers = {"1.0.0": reference(fleet.models[("clf", "1.0.0")], x), "1.1.0": reference(m2, x)}
    seen: list[tuple[int, str | None, bool]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                r = client.post(
                    f"{cloud_process.url}/v2/models/clf/infer", json=infer_body(x), headers=device.headers()
                )
                if r.status_code != 200:
                    seen.append((r.status_code, None, False))
                    continue
                version = r.json()["model_version"]
                got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 3)
                seen.append((200, version, bool(np.array_equal(got, answers[version]))))

    def versions_seen() -> set[str | None]:
        return {v for _, v, _ in seen[-20:]}

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(seen) > 50, what="traffic")
        fleet.push("clf", "1.1.0", m2)
        wait_for(lambda: versions_seen() == {"1.1.0"}, what="1.1.0 to answer")
        n_before_revoke = len(seen)
        fleet.revoke("clf", "1.1.0")
        wait_for(
            lambda: len(seen) > n_before_revoke + 20 and versions_seen() == {"1.0.0"}, what="1.0.0 again"
        )
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert [s for s in seen if s[0] != 200] == []
    assert all(correct for _, _, correct in seen)
    assert {v for _, v, _ in seen} == {"1.0.0", "1.1.0"}
    versioned = f"{cloud_process.url}/v2/models/clf/versions/1.1.0/ready"
    assert httpx.get(versioned, headers=device.headers()).status_code == 404
    meta = httpx.get(f"{cloud_process.url}/v2/models/clf", headers=device.headers()).json()
    assert meta["versions"] == ["1.0.0"]
    metrics = httpx.get(f"{cloud_process.url}/metrics").text
    assert 'fleet_cloud_model_loaded{default="true",model="clf",version="1.0.0"} 1' in metrics
    assert "1.1.0" not in metrics


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--models", "Bad Name"], {}, "invalid cloud model 'Bad Name'"),
        (["--models", "clf@v1"], {}, "NAME@VERSION"),
        (["--host", "0.0.0.0", "--models", "clf"], {}, "refusing to serve plain HTTP on 0.0.0.0"),
        (["--port", "99999"], {}, "FLEET_CLOUD_PORT"),
        ([], {"FLEET_CLOUD_TLS_CERT": "/etc/hostname"}, "FLEET_CLOUD_TLS_KEY go together"),
    ],
)
def test_cli_refuses_bad_settings_with_one_line(tmp_path, args, env, message):
    result = CliRunner().invoke(main, ["cloud", "serve", *args], env={"FLEET_DATA_DIR": str(tmp_path), **env})
    assert result.exit_code != 0
    assert message in result.output + str(result.exception)
