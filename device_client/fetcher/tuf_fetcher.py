"""The ``tuf.ngclient`` fetcher over httpx: metadata and small targets, each capped in size and
bounded by a total deadline (metadata files are small, so they stay on httpx)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

from .errors import Interrupted, TooLarge
from .settings import Deadline, HttpSettings


def _send(
    client: httpx.Client, url: str, headers: Mapping[str, str], deadline: Deadline, http: HttpSettings
) -> httpx.Response:
    deadline.check(url)
    request = client.build_request("GET", url, headers=dict(headers), timeout=deadline.timeout(http))
    try:
        return client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        deadline.check(url)
        raise tuf_exc.SlowRetrievalError(f"{url}: {exc.__class__.__name__}") from exc
    except httpx.HTTPError as exc:
        raise tuf_exc.DownloadError(f"{url}: {exc.__class__.__name__}: {exc}") from exc


def _stream(response: httpx.Response, url: str, deadline: Deadline) -> Iterator[bytes]:
    """The body as it arrives; closes the response; maps transport errors."""
    try:
        for chunk in response.iter_raw():
            deadline.check(url)
            if chunk:
                yield chunk
        deadline.check(url)
    except httpx.TimeoutException as exc:
        deadline.check(url)
        raise Interrupted(f"{url}: stalled ({exc.__class__.__name__})") from exc
    except httpx.HTTPError as exc:
        raise Interrupted(f"{url}: connection broke: {exc}") from exc
    finally:
        response.close()


class HttpxFetcher(FetcherInterface):
    """``tuf.ngclient`` fetcher: bearer token / client cert, size cap, hard total deadline per URL.

    ``max_bytes`` caps every response on top of the ``max_length`` that ngclient enforces.
    """

    def __init__(
        self,
        http: HttpSettings | None = None,
        *,
        deadline_s: float = 60.0,
        max_bytes: int = 16 * 1024 * 1024,
        client: httpx.Client | None = None,
    ) -> None:
        self.http = http or HttpSettings()
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self._client = client or self.http.client()

    def close(self) -> None:
        self._client.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        deadline = Deadline(self.deadline_s)
        response = _send(self._client, url, self.http.headers(url), deadline, self.http)
        if response.status_code >= 400:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {response.status_code}", response.status_code)
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response.close()
            raise TooLarge(f"{url}: announces {declared} bytes, cap is {self.max_bytes}")
        return self._capped(response, url, deadline)

    def _capped(self, response: httpx.Response, url: str, deadline: Deadline) -> Iterator[bytes]:
        received = 0
        for chunk in _stream(response, url, deadline):
            received += len(chunk)
            if received > self.max_bytes:
                response.close()
                raise TooLarge(f"{url}: more than {self.max_bytes} bytes")
            yield chunk
