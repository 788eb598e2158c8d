"""Make a Mosquitto on this host re-read its CRL after a decommission.

Mosquitto reads ``crlfile`` when it starts and again on ``SIGHUP``; without a reload a running
broker keeps accepting a revoked certificate. :func:`reload_local_brokers` finds the local
``mosquitto -c <conf>`` processes running the generated configuration (the embedded broker, or a
system service started on that file) through ``/proc`` and signals them. Connections already open
are not cut by a reload; a decommissioned device still connected is only confined to its own
topics, and the server drops its messages (``unknown_device``). A broker on another host (set
``FLEET_MQTT_URL``) must be reloaded by its operator (``systemctl reload mosquitto`` / SIGHUP)
after the CRL file is copied there.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def _config_of(pid_dir: Path) -> Path | None:
    """The resolved ``-c`` argument of a mosquitto process, or None."""
    try:
        args = [a.decode(errors="replace") for a in (pid_dir / "cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return None
    if not args or not Path(args[0]).name.startswith("mosquitto") or "-c" not in args[:-1]:
        return None
    conf = Path(args[args.index("-c") + 1])
    if not conf.is_absolute():
        try:
            conf = Path(os.readlink(pid_dir / "cwd")) / conf
        except OSError:
            return None
    return conf.resolve()


def reload_local_brokers(conf: Path, proc: Path = Path("/proc")) -> int:
    """SIGHUP every local mosquitto running ``conf``; return how many were signalled."""
    if not proc.is_dir():
        return 0
    target = conf.resolve()
    count = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit() or _config_of(entry) != target:
            continue
        try:
            os.kill(int(entry.name), signal.SIGHUP)
        except OSError as exc:
            log.warning("cannot signal mosquitto %s to reload its CRL: %s", entry.name, exc)
            continue
        log.info("mosquitto %s re-reads its CRL", entry.name)
        count += 1
    return count
