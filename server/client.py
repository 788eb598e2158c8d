"""Typed httpx client of the admin REST API, for rollout scripts and the ``fleet`` CLI.

    with FleetClient("http://127.0.0.1:8080", token) as fleet:
        fleet.push_model("resnet", "1.2.0", Path("resnet.onnx"))

Every non-2xx answer raises :class:`FleetAPIError` carrying the status and the server's message.
This module depends only on the base install (httpx, pydantic), not on the server's extras.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
#: read/write/pool timeout of ordinary API calls, seconds
DEFAULT_TIMEOUT_S = 60.0
#: connecting must be quick whatever the call: an unreachable server fails fast
CONNECT_TIMEOUT_S = 10.0
#: read/write timeout of model uploads: sending a large file over a slow link, then the server's
#: validation, bundling and signing, can take far longer than an ordinary call
UPLOAD_TIMEOUT_S = 1800.0


class FleetAPIError(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class _ProgressReader:
    """A file wrapper reporting bytes read, for upload progress bars."""

    def __init__(self, fh: BinaryIO, callback: Callable[[int], None]) -> None:
        self.fh = fh
        self.callback = callback

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.callback(len(data))
        return data


class FleetClient:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        upload_timeout: float = UPLOAD_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``timeout`` bounds each read/write of ordinary calls, ``upload_timeout`` those of
        :meth:`push_model` (whose answer only comes once the server has validated, bundled and
        signed the model), ``connect_timeout`` every connection attempt."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = httpx.Timeout(timeout, connect=min(connect_timeout, timeout))
        self.upload_timeout = httpx.Timeout(upload_timeout, connect=min(connect_timeout, upload_timeout))
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        r = self.http.request(method, url, **kwargs)
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body.get("detail", r.text) if isinstance(body, dict) else r.text
            except ValueError:
                detail = r.text
            if not isinstance(detail, str):
                detail = json.dumps(detail)
            raise FleetAPIError(r.status_code, detail)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    # -- admin ---------------------------------------------------------------------------------
    def create_admin_token(self, name: str, role: str, ttl_s: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "role": role}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return self._call("POST", "/api/v1/admin/tokens", json=body)

    def list_admin_tokens(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/admin/tokens")

    def revoke_admin_token(self, token_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/api/v1/admin/tokens/{token_id}")

    def audit(self, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if action:
            params["action"] = action
        return self._call("GET", "/api/v1/audit", params=params)["items"]

    # -- devices ------------------------------------------------------------------------------
    def create_enroll_token(
        self, tags: dict[str, str] | None = None, uses: int = 1, ttl_s: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"tags": tags or {}, "uses": uses}
        if ttl_s:
            body["ttl_s"] = ttl_s
        return self._call("POST", "/api/v1/enroll-tokens", json=body)

    def list_devices(
        self,
        *,
        tags: dict[str, str] | None = None,
        status: str | None = None,
        arch: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> dict[str, Any]:
        params: list[tuple[str, Any]] = [("limit", limit)]
        params += [("tag", f"{k}:{v}") for k, v in (tags or {}).items()]
        if status:
            params.append(("status", status))
        if arch:
            params.append(("arch", arch))
        if cursor:
            params.append(("cursor", cursor))
        return self._call("GET", "/api/v1/devices", params=params)

    def iter_devices(self, **filters: Any) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            page = self.list_devices(cursor=cursor, **filters)
            yield from page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def get_device(self, device_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/devices/{device_id}")

    def tag_device(
        self, device_id: str, set_tags: dict[str, str] | None = None, remove: list[str] | None = None
    ) -> dict[str, Any]:
        return self._call(
            "PATCH", f"/api/v1/devices/{device_id}/tags", json={"set": set_tags or {}, "remove": remove or []}
        )

    def decommission_device(self, device_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/devices/{device_id}/decommission")

    # -- models -------------------------------------------------------------------------------
    def push_model(
        self,
        name: str,
        version: str,
        file: Path,
        *,
        variant: str = "default",
        metadata: dict[str, Any] | None = None,
        validation: Path | None = None,
        progress: Callable[[int], None] | None = None,
        quantize: str | None = None,
        calibration: str | None = None,
        min_agreement: float | None = None,
        int8_cpu_flags: str | None = None,
        calibration_data: Path | None = None,
    ) -> dict[str, Any]:
        """Upload and publish a model version, with the long ``upload_timeout``.
        ``calibration_data``: an ``.npz`` of calibration inputs (``inputs/<name>``) for a static
        int8 quantization (with ``quantize="int8"``).

        Should it still time out, the server may yet commit the version: look before retrying
        (``get_version``), since a second push of the same version is a 409.
        """
        data = {"version": version, "variant": variant}
        if metadata:
            data["metadata"] = json.dumps(metadata)
        if quantize:
            data["quantize"] = quantize
        if calibration:
            data["calibration"] = calibration
        if min_agreement is not None:
            data["min_agreement"] = str(min_agreement)
        if int8_cpu_flags:
            data["int8_cpu_flags"] = int8_cpu_flags
        with open(file, "rb") as fh:
            reader: Any = _ProgressReader(fh, progress) if progress else fh
            files: dict[str, Any] = {"file": (file.name, reader, "application/octet-stream")}
            if validation is not None:
                files["validation"] = (validation.name, validation.read_bytes(), "application/octet-stream")
            if calibration_data is not None:
                files["calibration_data"] = (
                    calibration_data.name,
                    calibration_data.read_bytes(),
                    "application/octet-stream",
                )
            return self._call(
                "POST", f"/api/v1/models/{name}/versions", data=data, files=files, timeout=self.upload_timeout
            )

    def list_models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/models")

    def get_model(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/models/{name}")

    def list_versions(self, name: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/api/v1/models/{name}/versions")

    def get_version(self, name: str, version: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/models/{name}/versions/{version}")

    def revoke_version(self, name: str, version: str) -> dict[str, Any]:
        return self._call("DELETE", f"/api/v1/models/{name}/versions/{version}")

    def field_accuracy(
        self, name: str, *, since: str | None = None, bucket_s: int | None = None
    ) -> dict[str, Any]:
        """Per version and time bucket: requests, who answered, escalation rate, cloud agreement.
        ``since``: an ISO 8601 time (default: 24 hours ago); ``bucket_s``: seconds (default 3600)."""
        params: dict[str, Any] = {}
        if since is not None:
            params["since"] = since
        if bucket_s is not None:
            params["bucket_s"] = bucket_s
        return self._call("GET", f"/api/v1/models/{name}/field-accuracy", params=params)

    def export_examples(
        self, name: str, dest: BinaryIO, *, since: str | None = None, limit: int | None = None
    ) -> int:
        """Stream the model's hard examples (``.npz``) into ``dest``; returns how many (admin)."""
        params: dict[str, Any] = {}
        if since is not None:
            params["since"] = since
        if limit is not None:
            params["limit"] = limit
        url = f"/api/v1/models/{name}/examples"
        with self.http.stream("GET", url, params=params, timeout=self.upload_timeout) as r:
            if r.status_code >= 400:
                r.read()
                try:
                    detail = str(r.json().get("detail", r.text))
                except (ValueError, AttributeError):
                    detail = r.text
                raise FleetAPIError(r.status_code, detail)
            for chunk in r.iter_bytes(1024 * 1024):
                dest.write(chunk)
            return int(r.headers.get("x-fleet-examples", "0"))

    def purge_examples(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/api/v1/models/{name}/examples")

    # -- offline targets signing (fleet model sign) ----------------------------------------------
    def staged_targets(self) -> dict[str, Any] | None:
        """What waits for the offline targets key, or None when nothing is staged."""
        try:
            return self._call("GET", "/api/v1/repository/targets/staged")
        except FleetAPIError as exc:
            if exc.status_code == 404:
                return None
            raise

    def stage_targets_renewal(self) -> dict[str, Any]:
        return self._call("POST", "/api/v1/repository/targets/staged")

    def publish_signed_targets(self, signed: bytes) -> dict[str, Any]:
        return self._call(
            "PUT", "/api/v1/repository/targets", content=signed, headers={"Content-Type": "application/json"}
        )

    def download_target(
        self, file: str, dest: BinaryIO, progress: Callable[[int], None] | None = None
    ) -> None:
        """Stream the stored target file ``file`` (its consistent-snapshot name) into ``dest``."""
        with self.http.stream("GET", f"/tuf/targets/{file}", timeout=self.upload_timeout) as r:
            if r.status_code >= 400:
                r.read()
                raise FleetAPIError(r.status_code, r.text)
            for chunk in r.iter_bytes(1024 * 1024):
                dest.write(chunk)
                if progress is not None:
                    progress(len(chunk))

    # -- rollouts -----------------------------------------------------------------------------
    def create_rollout(
        self,
        body: dict[str, Any],
        *,
        routing: dict[str, Any] | None = None,
        skip_unfit: bool | None = None,
    ) -> dict[str, Any]:
        """Create a rollout from ``body`` (the API's JSON); ``routing``, the routing policy its
        DesiredStates carry, may also be given here (it replaces ``body["routing"]``), and
        ``skip_unfit``: leave out the selected devices no variant fits (else a 422 names them)."""
        if routing is not None:
            body = {**body, "routing": routing}
        if skip_unfit is not None:
            body = {**body, "skip_unfit": skip_unfit}
        return self._call("POST", "/api/v1/rollouts", json=body)

    def preview_rollout(
        self, model: str, version: str, selector: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """How many devices ``selector`` (none: every device) matches would get each variant of
        the version, and how many no variant fits (``unfit``, ``unfit_examples``)."""
        params = {"model": model, "version": version}
        if selector:
            params["selector"] = json.dumps(selector)
        return self._call("GET", "/api/v1/rollouts/preview", params=params)

    def get_rollout(self, rollout_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/rollouts/{rollout_id}")

    def list_rollouts(
        self,
        status: list[str] | None = None,
        limit: int = 100,
        *,
        model: str | None = None,
        version: str | None = None,
    ) -> list[dict[str, Any]]:
        """Rollouts, newest first: of these statuses, and of ``model`` (and ``version``) if given."""
        params: list[tuple[str, Any]] = [("limit", limit)] + [("status", s) for s in status or []]
        params += [(k, v) for k, v in (("model", model), ("version", version)) if v is not None]
        return self._call("GET", "/api/v1/rollouts", params=params)

    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        """``action`` is one of start, pause, resume, abort, rollback, promote."""
        return self._call("POST", f"/api/v1/rollouts/{rollout_id}/{action}")

    def wait_rollout(
        self,
        rollout_id: str,
        *,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the rollout stops (completed, paused, aborted, rolled_back) and return it."""
        import time

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            state = self.get_rollout(rollout_id)
            if on_update is not None:
                on_update(state)
            if state["status"] in ("completed", "paused", "aborted", "rolled_back"):
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"rollout {rollout_id} still {state['status']} after {timeout_s}s")
            time.sleep(poll_s)

    def assign_desired(self, device_id: str, model: str, version: str, **extra: Any) -> dict[str, Any]:
        return self._call(
            "PUT", f"/api/v1/devices/{device_id}/desired", json={"model": model, "version": version, **extra}
        )
