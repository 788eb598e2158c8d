"""``fleet model ...``: push, list and revoke ML model versions through the admin API, and sign
staged targets with the offline targets key on the signer's workstation (``fleet model sign``).

Progress bars, the bundle checks and the signing libraries load inside the commands that use them:
start-up stays fast, and the base install (no signing libraries) can load this module.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click
from rich.markup import escape
from rich.table import Table

from server.cli import common
from server.cli.common import ApiGroup, api_options, console, err_console, fail
from server.client import UPLOAD_TIMEOUT_S, FleetClient

if TYPE_CHECKING:
    from rich.progress import Progress


def _transfer_progress() -> Progress:
    """A transient byte-progress bar on stderr (uploads and downloads)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    return Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=err_console, transient=True,
        disable=not err_console.is_terminal,  # a script capturing stderr gets no stray newline
    )  # fmt: skip


@click.group(cls=ApiGroup)
def model() -> None:
    """The model registry."""


@model.command("push")
@api_options
@click.argument("name")
@click.argument("version")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--variant", default="default", show_default=True, help="hardware variant")
@click.option(
    "--metadata", default=None, help="JSON: preprocessing, validation {rtol, atol, compare}, constraints"
)
@click.option(
    "--validation",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help=".npz of validation inputs (inputs/<name>)",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="also build an int8 variant on the server, measured against this fp32 model",
)
@click.option(
    "--calibration",
    type=click.Choice(["dynamic", "static"]),
    default=None,
    help="int8 quantization: dynamic (default) or static QDQ calibrated on the validation inputs",
)
@click.option(
    "--calibration-data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help=".npz of calibration inputs (inputs/<name>) for a static int8 calibration (implies static)",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    default=None,
    help="refuse the push when int8 agrees with fp32 on fewer validation inputs [server: 0.99]",
)
@click.option(
    "--int8-cpu-flags",
    default=None,
    help="comma-separated CPU flags the int8 variant requires (e.g. avx512_vnni): others get fp32",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=UPLOAD_TIMEOUT_S,
    show_default=True,
    help="read/write timeout of the upload in seconds (the answer comes after validation and signing)",
)
def model_push(
    url: str,
    token: str | None,
    name: str,
    version: str,
    file: Path,
    variant: str,
    metadata: str | None,
    validation: Path | None,
    quantize: str | None,
    calibration: str | None,
    calibration_data: Path | None,
    min_agreement: float | None,
    int8_cpu_flags: str | None,
    timeout_s: float,
) -> None:
    """Upload an ONNX model; the server validates, bundles, signs and publishes it.

    Should the upload time out, the server may still publish the version: check with
    ``fleet model ls NAME`` before pushing again (the same version twice is a 409)."""
    meta = None
    if metadata:
        try:
            meta = json.loads(metadata)
        except ValueError as exc:
            raise click.BadParameter(f"--metadata is not JSON: {exc}") from None
    size = os.path.getsize(file)
    with common.api_client(url, token, upload_timeout=timeout_s) as client, _transfer_progress() as progress:
        task = progress.add_task(f"uploading {file.name}", total=size)
        result = client.push_model(
            name,
            version,
            file,
            variant=variant,
            metadata=meta,
            validation=validation,
            progress=lambda n: progress.advance(task, n),
            quantize=quantize,
            calibration=calibration,
            calibration_data=calibration_data,
            min_agreement=min_agreement,
            int8_cpu_flags=int8_cpu_flags,
        )
    art = next(
        (a for a in result.get("artifacts", result.get("variants", [])) if a.get("variant") == variant), None
    )
    staged = result.get("status") == "pending" or (art is not None and art.get("published") is False)
    click.echo(
        f"{'staged' if staged else 'published'} {name} {version} (release {result.get('release')})"
        + (f": {art.get('target_path')} {art.get('length')} bytes" if art else "")
    )
    for built in result.get("variants", []):
        m = built.get("measurements") or {}
        if m and built.get("variant") != variant:
            click.echo(
                f"{built['variant']}: {m['size_bytes']} bytes ({m['size_ratio']:.2f}x), agreement "
                f"{m['agreement']:.2%} ({m['agreement_metric']}), latency {m['latency_ratio']:.2f}x fp32"
                + (f", calibration {m['calibration']}" if m.get("calibration") else "")
            )
    if staged:
        click.echo(
            "the targets key is not on the server: the bundle is listed once `fleet model sign "
            "--targets-key PATH` signs it (docs/keys.md)"
        )


@model.command("ls")
@api_options
@click.argument("name", required=False)
def model_ls(url: str, token: str | None, name: str | None) -> None:
    """List models, or the versions of NAME."""
    with common.api_client(url, token) as client:
        if name is None:
            table = Table("model", "latest", "release", "versions")
            for m in client.list_models():
                table.add_row(
                    m["name"],
                    str(m.get("latest_version") or ""),
                    str(m.get("last_release", "")),
                    str(m.get("version_count", "")),
                )
        else:
            table = Table("version", "release", "status", "variants", "created")
            for v in client.list_versions(name):
                variants = ",".join(a["variant"] for a in v.get("artifacts", v.get("variants", [])))
                table.add_row(
                    v["version"], str(v["release"]), v["status"], variants, str(v["created_at"])[:19]
                )
    console.print(table)


#: ``--since`` as a duration back from now: 90s, 30m, 24h, 7d
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> str:
    """``--since``: a duration back from now (``24h``) or an ISO 8601 time, as an ISO 8601 time."""
    match = _DURATION.fullmatch(text.strip())
    if match:
        back = timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])
        return (datetime.now(UTC) - back).isoformat()
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a duration (90s, 30m, 24h, 7d) nor an ISO 8601 time", param_hint="--since"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def accuracy_table(data: dict[str, Any]) -> Table:
    """Per version (a total row, then its buckets): requests, who answered, escalated share and
    cloud agreement (with the answers compared)."""
    title = f"field accuracy of {data['model']} since {str(data['since'])[:19]} ({data['bucket_s']}s buckets)"
    table = Table("version", "from", title=escape(title))
    for column in ("requests", "edge", "cloud", "cache", "escalated", "cloud agreement", "compared"):
        table.add_column(column, justify="right")
    for v in data["versions"]:
        for i, row in enumerate([v, *v["buckets"]]):
            table.add_row(
                v["version"] if i == 0 else "", "all" if i == 0 else str(row["start"])[:19],
                str(row["requests"]), str(row["answered_edge"]), str(row["answered_cloud"]),
                str(row["answered_cache"]), _pct(row["escalation_rate"]),
                "" if row["cloud_agreement"] is None else f"{row['cloud_agreement']:.3f}",
                str(row["cloud_compared"]),
            )  # fmt: skip
    if not data["versions"]:
        table.caption = "no health windows in that span"
    return table


@model.command("accuracy")
@api_options
@click.argument("name")
@click.option("--since", default="24h", show_default=True, help="a duration back from now, or an ISO time")
@click.option("--bucket", "bucket_s", type=click.IntRange(60, 7 * 86400), default=3600, show_default=True,
              help="bucket seconds")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
def model_accuracy(url: str, token: str | None, name: str, since: str, bucket_s: int, as_json: bool) -> None:
    """Field accuracy of NAME per version over time: requests, who answered them (edge, cloud,
    cache), the share escalated to the cloud and how often the edge answer matched the cloud's."""
    with common.api_client(url, token) as client:
        data = client.field_accuracy(name, since=parse_since(since), bucket_s=bucket_s)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        console.print(accuracy_table(data))


@model.command("revoke")
@api_options
@click.argument("name")
@click.argument("version")
def model_revoke(url: str, token: str | None, name: str, version: str) -> None:
    """Revoke a version: its bundles leave the signed repository."""
    with common.api_client(url, token) as client:
        v = client.revoke_version(name, version)
    click.echo(f"{name} {version}: {v['status']}")


@model.command("sign")
@api_options
@click.option(
    "--targets-key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="the offline targets private key (PEM)",
)
@click.option(
    "--renew", is_flag=True, help="when nothing is staged, stage a renewal (same targets, new expiry)"
)
@click.option("--no-verify", is_flag=True, help="do not download and check the bundles about to be listed")
@click.option("--yes", "-y", is_flag=True, help="sign without asking")
def model_sign(url: str, token: str | None, key_path: Path, renew: bool, no_verify: bool, yes: bool) -> None:
    """Sign the staged targets metadata with the offline targets key (on the signer's workstation).

    While the targets key is not on the server, pushes and revocations are staged; this fetches
    what is staged, downloads each bundle about to be listed and checks its length, hash and
    manifest against what is being signed, shows the changes, signs them with --targets-key and
    publishes them. See docs/keys.md ("Keeping root and targets offline")."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.signer import SSlibKey

    from server.trust.keys import load_private_key
    from server.trust.repository import sign_staged_targets

    try:
        key = load_private_key(key_path)
    except Exception as exc:
        fail(f"cannot read the targets key {key_path}: {escape(str(exc))}")
    if not isinstance(key, Ed25519PrivateKey):
        fail(f"{key_path} is not an Ed25519 key (the repository's keys are Ed25519)")
    keyid = SSlibKey.from_crypto(key.public_key()).keyid
    with common.api_client(url, token) as client:
        staged = client.staged_targets()
        if staged is None and renew:
            staged = client.stage_targets_renewal()
        if staged is None:
            click.echo("nothing is staged for the targets key (use --renew to renew the current targets)")
            return
        root = client.http.get("/tuf/metadata/root.json").json()
        if keyid not in root["signed"]["roles"]["targets"]["keyids"]:
            fail(f"{key_path} is not a targets key of the repository's current root (key id {keyid[:16]})")
        if not no_verify and staged["listed"]:
            _check_staged_bundles(client, staged["listed"])
        table = Table("", "target", "model", "version", "release", "bytes")
        for sign, items in (("+", staged["listed"]), ("-", staged["unlisted"])):
            for t in items:
                c = t.get("custom", {})
                table.add_row(
                    sign,
                    t["path"],
                    str(c.get("model", "")),
                    str(c.get("version", "")),
                    str(c.get("release", "")),
                    str(t["length"]),
                )
        expires = datetime.now(UTC) + timedelta(seconds=staged["lifetime_s"])
        console.print(
            f"targets v{staged['current_version']} -> v{staged['version']}, "
            f"expires {expires.isoformat(timespec='seconds')}"
        )
        console.print(table)
        if not yes and not click.confirm("sign and publish?", default=False):
            fail("nothing signed", code=1)
        signed = sign_staged_targets(staged["metadata"], key, expires)
        result = client.publish_signed_targets(signed)
    published = ", ".join(result["published"]) or "none"
    unlisted = ", ".join(result["unlisted"]) or "none"
    click.echo(
        f"published targets v{result['version']} (expires {str(result['expires'])[:19]}); "
        f"now listed: {published}; no longer listed: {unlisted}"
    )


def _check_staged_bundles(client: FleetClient, listed: list[dict[str, Any]]) -> None:
    """Download and check each bundle about to be listed (server/catalog/staged_check.py), with a
    progress bar each; any mismatch is an error and nothing is signed."""
    from server.catalog.staged_check import StagedBundleMismatch, check_staged_bundles

    with tempfile.TemporaryDirectory(prefix="fleet-sign-") as tmp, _transfer_progress() as progress:

        def download(target: dict[str, Any], fh: BinaryIO) -> None:
            task = progress.add_task(f"checking {target['path']}", total=target["length"])
            client.download_target(target["file"], fh, lambda k: progress.advance(task, k))

        try:
            check_staged_bundles(listed, download, Path(tmp))
        except StagedBundleMismatch as exc:
            fail(escape(str(exc)))
