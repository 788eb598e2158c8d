"""``fleet demo`` and ``fleet simulate``: the end-to-end demo with real device daemons, and a
simulated fleet over real MQTT (:mod:`server.demo`, :mod:`server.sim`, loaded when they run)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from server.cli.common import parse_tags


@click.command("demo")
@click.option(
    "--devices",
    "n_devices",
    type=click.IntRange(1, 50),
    default=4,
    show_default=True,
    help="real device daemons to run (each a process with onnxruntime)",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="keep everything here (default: a temporary directory, removed afterwards)",
)
def demo_cmd(n_devices: int, workdir: Path | None) -> None:
    """Server + Mosquitto + real device daemons: roll out a good version in stages, then a bad one
    whose canary trips and is rolled back automatically."""
    from server.demo import demo

    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(demo(n_devices, workdir))


@click.command("simulate")
@click.option("--devices", "n_devices", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--server", "server_url", default=None, help="server URL; omit to run an embedded server")
@click.option("--token", envvar="FLEET_TOKEN", help="operator/admin token of --server (FLEET_TOKEN)")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="keep identities here (reused on the next run against the same server)")  # fmt: skip
@click.option("--processes", type=int, default=0, help="worker processes (default: one per 2,500 devices)")
@click.option("--prefix", default="sim", show_default=True, help="device ids are PREFIX-00000, ...")
@click.option("--tags", default=None, help="tags of the simulated devices, k=v,k2=v2")
@click.option("--serving", multiple=True, help="model=version every device serves at start (repeatable)")
@click.option("--profile", "profiles", multiple=True,
              help="VERSION:key=value,... behaviour of a version (* for all), e.g. "
                   "2.0.0:download=3,install=1,fail=0.05,errors=0.01,p95=12")  # fmt: skip
@click.option("--health-window", type=float, default=10.0, show_default=True, help="seconds; 0 = none")
@click.option("--duration", type=float, default=0.0, help="stop after this many seconds (0 = Ctrl-C)")
def simulate_cmd(
    n_devices: int, server_url: str | None, token: str | None, workdir: Path | None, processes: int,
    prefix: str, tags: str | None, serving: tuple[str, ...], profiles: tuple[str, ...], health_window: float,
    duration: float,
) -> None:  # fmt: skip
    """N simulated devices over real MQTT (own identity and mTLS connection each), speaking the real
    protocol; against --server, or an embedded server + Mosquitto."""
    from server.sim.run import simulate

    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(simulate(
        n_devices, server_url=server_url, token=token, workdir=workdir, processes=processes, prefix=prefix,
        tags=parse_tags(tags), serving=parse_tags(",".join(serving)), profiles=list(profiles),
        health_window_s=health_window, duration_s=duration,
    ))  # fmt: skip
