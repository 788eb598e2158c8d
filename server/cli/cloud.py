"""``fleet cloud serve``: the embedded cloud inference tier (Open Inference Protocol v2).

Server-only modules load inside the command, so a device-only install can still run ``fleet``.
"""

from __future__ import annotations

from typing import Any

import click

from server.cli.common import fail
from server.cli.serve import settings_error


@click.group()
def cloud() -> None:
    """The cloud inference tier (Open Inference Protocol v2)."""


@cloud.command("serve")
@click.option("--host", default=None, help="bind address (FLEET_CLOUD_HOST, default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="port (FLEET_CLOUD_PORT, default 8600)")
@click.option("--models", default=None, help="NAME or NAME@VERSION, comma-separated (FLEET_CLOUD_MODELS)")
def cloud_serve(host: str | None, port: int | None, models: str | None) -> None:
    """Serve the catalog's cloud models, installed from the image repository like a device's."""
    from pydantic import ValidationError

    from server.cloud.serve import run_cloud
    from server.cloud.service import CloudConfigError
    from server.config import Settings

    given = (("cloud_host", host), ("cloud_port", port), ("cloud_models", models))
    overrides: dict[str, Any] = {name: value for name, value in given if value is not None}
    try:
        run_cloud(Settings(**overrides))
    except ValidationError as exc:
        fail(settings_error(exc), code=2)
    except CloudConfigError as exc:
        fail(str(exc), code=2)
