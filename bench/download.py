"""Download + verify throughput / ``openssl dgst -sha256`` on the same file (docs/benchmarks.md).

    .venv/bin/python bench/download.py [--mb 200] [--runs 3]

Downloads a target of ``--mb`` MB from a real server's ``/tuf/targets/`` through the device's own
``download_resumable`` (target >= 0.85), and prints the ratio this disk's durable-write ceiling
allows (``TMPDIR=/dev/shm`` takes the disk out). Writes bench/results/download.json. Exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, ratio_line, write_result

TARGET = ">= 0.85"
TARGET_PATH = "bench/big.bundle.tar"


def make_file(path: Path, mb: int) -> str:
    """``mb`` MB of incompressible bytes (each MB a different random block); its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        for _ in range(mb):
            block = os.urandom(1024 * 1024)
            h.update(block)
            fh.write(block)
    return h.hexdigest()


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"the server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def openssl_s(path: Path, sha: str) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", str(path)], capture_output=True, text=True, check=True
    )
    elapsed = time.perf_counter() - t0
    assert sha in out.stdout, out.stdout
    return elapsed


def durable_write_s(path: Path, size: int) -> float:
    """Seconds to put ``size`` bytes on this disk durably, the fastest way: write them all (into
    the page cache), then one fsync. The download must end durable too (the device fsyncs the
    bundle before it records the download), so this is its ceiling here; openssl reads its file
    from the page cache and never waits for the disk."""
    block = os.urandom(1024 * 1024)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < size:
            written += os.write(fd, block[: min(len(block), size - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from device_client.fetcher import HttpSettings, download_resumable
    from server.admin.service import CLI_PRINCIPAL, AdminService
    from server.admin.tables import Role
    from server.config import Settings
    from server.context import ServerContext
    from server.mqtt.broker import free_port
    from server.trust.repository import consistent_target_name

    with tempfile.TemporaryDirectory(prefix="fleet-bench-download-") as tmp:
        work = Path(tmp)
        port = free_port()
        env = {
            "FLEET_DATA_DIR": str(work / "server"), "FLEET_PORT": str(port), "FLEET_MQTT_ENABLED": "false",
            "FLEET_ROLLOUT_ENGINE": "false", "FLEET_METADATA_REFRESH_INTERVAL_S": "3600",
            "FLEET_HEALTH_ROLLUP_INTERVAL_S": "3600", "FLEET_LOG_LEVEL": "WARNING",
        }  # fmt: skip
        ctx = ServerContext.open(Settings(**{k[6:].lower(): v for k, v in env.items()}))
        try:
            with ctx.db.session_scope() as s:
                token = AdminService(s).create_token("bench", Role.viewer, CLI_PRINCIPAL).token
            staging = work / "staging.bin"
            sha = make_file(staging, args.mb)
            name = consistent_target_name(TARGET_PATH, sha)
            target = ctx.repo.targets_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staging, target)
        finally:
            ctx.close()
        size = target.stat().st_size
        # the server in its own process, as in production (a device is another machine)
        server = subprocess.Popen(
            [sys.executable, "-c", "from server.runner import run_server; run_server()"],
            env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_up(f"{url}/healthz", server)
            http = HttpSettings(token=token, read_timeout_s=120)
            openssl_runs, download_runs, disk_runs = [], [], []
            for i in range(args.runs):
                openssl_runs.append(openssl_s(target, sha))
                disk_runs.append(durable_write_s(work / f"disk-{i}.bin", size))
                dest = work / f"dl-{i}.tar.partial"
                t0 = time.perf_counter()
                final = download_resumable(
                    f"{url}/tuf/targets/{name}", dest, expected_length=size, expected_sha256=sha,
                    max_bytes=size, deadline_s=600, http=http,
                )  # fmt: skip
                download_runs.append(time.perf_counter() - t0)
                final.unlink()
        finally:
            server.terminate()
            server.wait(30)

    mb = size / 1e6
    dl_rate, ssl_rate = mb / min(download_runs), mb / min(openssl_runs)
    disk_rate = mb / min(disk_runs)
    ratio = dl_rate / ssl_rate
    print(f"download + verify of a {mb:.0f} MB target (best of {args.runs}) in {tempfile.gettempdir()}")
    print(f"  download_resumable from /tuf/targets: {dl_rate:.0f} MB/s")
    print(f"  openssl dgst -sha256 on the same file: {ssl_rate:.0f} MB/s")
    print(
        f"  this disk's ceiling for a durable write (write all, one fsync): {disk_rate:.0f} MB/s,"
        f" so the ratio can be at most {min(disk_rate / ssl_rate, 1.0):.2f} here"
    )
    print(ratio_line("download+verify / openssl dgst -sha256", ratio, TARGET))
    path = write_result(
        "download",
        {
            "target": TARGET, "bytes": size, "download_s": [round(t, 3) for t in download_runs],
            "openssl_s": [round(t, 3) for t in openssl_runs], "download_mb_s": round(dl_rate, 1),
            "openssl_mb_s": round(ssl_rate, 1), "ratio": round(ratio, 3),
            "durable_write_s": [round(t, 3) for t in disk_runs], "disk_ceiling_mb_s": round(disk_rate, 1),
            "work_dir": tempfile.gettempdir(),
        },
    )  # fmt: skip
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
