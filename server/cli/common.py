"""What every ``fleet`` command module shares: the consoles, one-line errors, the API options and
client, tag parsing, and the server context of commands that run on the server host.

Imports only the base install (click, httpx, rich, pydantic); server-only modules load inside the
functions that need them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click
import httpx
from rich.markup import escape

from device_client.console import make_console
from server.client import DEFAULT_URL, FleetAPIError, FleetClient
from server.devices.tags import parse_tags_csv
from server.errors import Invalid

if TYPE_CHECKING:
    from server.context import ServerContext

console = make_console()
err_console = make_console(stderr=True)  # errors: one line each, never wrapped


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: MESSAGE`` (rich markup) on stderr and exit with ``code``."""
    err_console.print(f"[red]error:[/red] {message}")
    sys.exit(code)


def parse_tags(text: str | None) -> dict[str, str]:
    """``k=v,k2:v2`` checked against the server's tag syntax (server/devices/tags.py): a bad tag is
    a one-line error here, before any request."""
    try:
        return parse_tags_csv(text or "")
    except Invalid as exc:
        fail(escape(exc.message), code=2)


class ApiGroup(click.Group):
    """A group whose commands get a FleetClient and turn API errors into clean messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FleetAPIError as exc:
            fail(f"server answered {exc.status_code}: {exc.detail}")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # refused, timed out, TLS, bad --url ...
            fail(transport_error(exc))
        except OSError as exc:
            fail(str(exc))


def transport_error(exc: httpx.HTTPError | httpx.InvalidURL) -> str:
    """One line for a request that got no answer: what failed, against which URL."""
    try:
        where = f" ({exc.request.method} {exc.request.url})" if isinstance(exc, httpx.HTTPError) else ""
    except RuntimeError:  # no request attached
        where = ""
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "request failed"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return escape(f"{kind}{where}: {reason}")


def api_options(fn: Any) -> Any:
    """``--url`` (FLEET_URL) and ``--token`` (FLEET_TOKEN) of a command that calls the admin API."""
    fn = click.option("--token", envvar="FLEET_TOKEN", help="admin bearer token (FLEET_TOKEN)")(fn)
    fn = click.option(
        "--url", envvar="FLEET_URL", default=DEFAULT_URL, show_default=True, help="server URL (FLEET_URL)"
    )(fn)
    return fn


def api_client(url: str, token: str | None, **options: Any) -> FleetClient:
    """The admin API client of a command; no token is a one-line error. Command modules call it
    as ``common.api_client`` so that one replacement here reaches them all."""
    if not token:
        fail("no admin token: pass --token or set FLEET_TOKEN (create one with `fleet admin token create`)")
    return FleetClient(url, token, **options)


def local_ctx() -> ServerContext:
    """The server's context from FLEET_* settings, for commands run on the server host."""
    # server-only (SQLAlchemy, Alembic): kept out of the device install's `fleet device ...`
    from server.config import Settings
    from server.context import ServerContext

    return ServerContext.open(Settings())
