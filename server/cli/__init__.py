"""The ``fleet`` command line, one module per command group.

Operator commands talk to the admin REST API through :class:`server.client.FleetClient`
(``--url``/``FLEET_URL``, ``--token``/``FLEET_TOKEN``); commands that run on the server host
(``server run``, ``admin token ...``, ``broker config``, ``keys ...``) use the server's ``Settings``,
database and key directory directly. Server-only modules load inside the commands, so the
device-only install (``pip install fleetota[device]``) can run ``fleet device ...``.
"""

from __future__ import annotations

import logging

import click

from device_client.cli import device
from device_client.logformat import log_handler
from server.cli.admin import admin, keys
from server.cli.cloud import cloud
from server.cli.devices import devices, enroll_token
from server.cli.examples import examples
from server.cli.models import model
from server.cli.rollouts import rollout
from server.cli.serve import broker, server
from server.cli.sim import demo_cmd, simulate_cmd

__all__ = ["main"]


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging (libraries included)")
def main(verbose: bool) -> None:
    """fleetota: signed ML model updates and staged rollouts for edge fleets."""
    # WARNING unless -v: a command's stdout is its answer (scripts capture it) and its stderr is
    # for problems; services (`server run`, `device run`) raise their own loggers to INFO
    # under systemd (stderr is $JOURNAL_STREAM): no timestamps, levels as <N> syslog prefixes
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[log_handler()])


for _command in (
    server,
    cloud,
    admin,
    broker,
    enroll_token,
    devices,
    model,
    examples,
    device,
    rollout,
    keys,
    demo_cmd,
    simulate_cmd,
):
    main.add_command(_command)
