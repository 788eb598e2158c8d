"""An Open Inference Protocol v2 (KServe V2) REST client: the device's way to ask a cloud model.

``POST {base}/v2/models/{name}[/versions/{v}]/infer`` with JSON tensors (name, shape, datatype,
flattened data) and ``GET .../ready``. An answer is accepted only when it names the policy's model
(and version, when pinned) and holds every requested output, finite, in the expected shape; every
other outcome is one :class:`CloudFailure` with a short ``kind``. Redirects are never followed.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from .budget import parse_retry_after

#: OIP tensor datatypes and their numpy dtypes (BYTES is not supported)
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_OIP_OF = {dt: name for name, dt in DATATYPES.items()}
#: the numpy kinds JSON data may arrive as for each kind of datatype (ints never from floats)
_ACCEPTS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024**2
_CHUNK = 64 * 1024


class CloudFailure(Exception):
    """The cloud did not give a usable answer. ``kind``: ``timeout``, ``unreachable``,
    ``http_error``, ``rate_limited`` (with ``retry_after_s``), ``bad_answer``, ``wrong_shape``,
    ``nan``, ``missing_output``, ``lying``, ``too_large``, ``unencodable`` and, from the router,
    ``bad_request``, ``unconfigured``, ``internal``."""

    def __init__(self, kind: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class CloudAnswer:
    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str | None
    elapsed_ms: float


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype (byte order ignored: JSON carries values)."""
    name = _OIP_OF.get(np.dtype(dtype).newbyteorder("="))
    if name is None:
        raise CloudFailure("unencodable", f"dtype {dtype} has no Open Inference Protocol datatype")
    return name


def encode_request(
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] = (),
    parameters: Mapping[str, Any] | None = None,
) -> bytes:
    """The JSON body of an infer request."""
    body: dict[str, Any] = {"id": uuid.uuid4().hex, "inputs": []}
    for name, arr in inputs.items():
        a = np.asarray(arr)
        datatype = oip_datatype(a.dtype)
        tensor = {"name": name, "shape": list(a.shape), "datatype": datatype, "data": a.ravel().tolist()}
        body["inputs"].append(tensor)
    if outputs:
        body["outputs"] = [{"name": n} for n in outputs]
    if parameters:
        body["parameters"] = dict(parameters)
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
    except ValueError as exc:  # NaN or Inf in an input: JSON cannot carry it
        raise CloudFailure("unencodable", f"inputs cannot be sent as JSON: {exc}") from None


def decode_tensor(obj: Any) -> tuple[str, np.ndarray]:
    """One output tensor of an answer; CloudFailure(``bad_answer``/``wrong_shape``/``nan``)."""
    if not isinstance(obj, dict):
        raise CloudFailure("bad_answer", "an output is not an object")
    name, datatype, shape, data = obj.get("name"), obj.get("datatype"), obj.get("shape"), obj.get("data")
    if not isinstance(name, str) or not isinstance(data, list):
        raise CloudFailure("bad_answer", "an output lacks its name or data")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise CloudFailure("bad_answer", f"output {name!r} has unsupported datatype {datatype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CloudFailure("bad_answer", f"output {name!r} has no valid shape")
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise CloudFailure("bad_answer", f"output {name!r}: unreadable data: {exc}") from None
    if raw.size and raw.dtype.kind not in _ACCEPTS[dtype.kind]:
        raise CloudFailure("bad_answer", f"output {name!r}: {raw.dtype} data for datatype {datatype}")
    if raw.size != math.prod(shape):
        raise CloudFailure("wrong_shape", f"output {name!r}: {raw.size} values for shape {shape}")
    try:
        with np.errstate(over="raise", invalid="raise"):
            arr = raw.astype(dtype).reshape(shape)
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise CloudFailure("bad_answer", f"output {name!r}: values do not fit {datatype}: {exc}") from None
    exact = raw.astype(np.float64).ravel()
    if dtype.kind in "iu" and raw.size and not np.array_equal(exact, arr.astype(np.float64).ravel()):
        raise CloudFailure("bad_answer", f"output {name!r}: values out of range for {datatype}")
    if dtype.kind == "f" and not np.isfinite(arr).all():
        raise CloudFailure("nan", f"output {name!r} holds NaN or Inf")
    return name, arr


class OipClient:
    """Asks one cloud model (``version`` None: its active version) over the Open Inference Protocol.

    ``http`` carries the TLS set-up (CA bundle, client certificate); ``headers`` the credential
    (a device token, or the header an external endpoint wants). :meth:`infer` honours
    ``timeout_s`` as a total deadline: every phase gets what is left, and the body is read in
    chunks with the deadline checked after each."""

    def __init__(
        self,
        base_url: str,
        model: str,
        version: str | None,
        *,
        timeout_s: float,
        http: httpx.Client | None = None,
        headers: Mapping[str, str] | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.version = version
        self.timeout_s = timeout_s
        self.http = http or httpx.Client(follow_redirects=False, trust_env=False)
        self.headers = dict(headers or {})
        self.max_response_bytes = max_response_bytes
        self._clock = clock

    def _model_url(self) -> str:
        url = f"{self.base_url}/v2/models/{quote(self.model, safe='')}"
        if self.version is not None:
            url += f"/versions/{quote(self.version, safe='')}"
        return url

    @property
    def infer_url(self) -> str:
        return self._model_url() + "/infer"

    @property
    def ready_url(self) -> str:
        return self._model_url() + "/ready"

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        parameters: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> CloudAnswer:
        """Ask the cloud model; ``outputs`` are requested and required, each of its shape in
        ``shapes`` where given. Raises :class:`CloudFailure`, nothing else."""
        t0 = self._clock()
        deadline = t0 + (self.timeout_s if timeout_s is None else timeout_s)
        body = encode_request(inputs, outputs=outputs, parameters=parameters)
        status, headers, raw = self._post(body, deadline)
        if status == 429:
            wait = parse_retry_after(headers.get("retry-after"))
            raise CloudFailure(
                "rate_limited", f"429 from the cloud; retry after {wait:g} s", retry_after_s=wait
            )
        if status != 200:
            raise CloudFailure("http_error", f"HTTP {status} from the cloud: {_error_text(raw)}")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CloudFailure("bad_answer", f"answer is not JSON: {exc}") from None
        answer = self._parse(doc, outputs, shapes or {})
        return CloudAnswer(answer, self.model, _version_of(doc), (self._clock() - t0) * 1000.0)

    def _post(self, body: bytes, deadline: float) -> tuple[int, httpx.Headers, bytes]:
        left = deadline - self._clock()
        if left <= 0:
            raise CloudFailure("timeout", "no time left for the cloud")
        headers = {**self.headers, "Content-Type": "application/json", "Accept": "application/json"}
        try:
            with self.http.stream(
                "POST", self.infer_url, content=body, headers=headers, timeout=httpx.Timeout(left)
            ) as resp:
                chunks, size = [], 0
                for chunk in resp.iter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > self.max_response_bytes:
                        raise CloudFailure("too_large", f"answer exceeds {self.max_response_bytes} bytes")
                    if self._clock() > deadline:
                        raise CloudFailure("timeout", f"answer not complete within {self.timeout_s:g} s")
                    chunks.append(chunk)
                return resp.status_code, resp.headers, b"".join(chunks)
        except httpx.TimeoutException:
            raise CloudFailure("timeout", f"no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise CloudFailure("unreachable", f"cloud unreachable: {exc or type(exc).__name__}") from None

    def _parse(
        self, doc: Any, wanted: Sequence[str], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        if not isinstance(doc, dict):
            raise CloudFailure("bad_answer", "answer is not a JSON object")
        name = doc.get("model_name")
        if name != self.model:
            raise CloudFailure("lying", f"answer names model {name!r}, the policy names {self.model!r}")
        version = _version_of(doc)
        if self.version is not None and version != self.version:
            raise CloudFailure("lying", f"answer names version {version!r}, the policy pins {self.version!r}")
        outs = doc.get("outputs")
        if not isinstance(outs, list):
            raise CloudFailure("bad_answer", "answer has no outputs list")
        result = dict(decode_tensor(o) for o in outs)
        for want in wanted:
            if want not in result:
                raise CloudFailure("missing_output", f"answer lacks output {want!r} (has {sorted(result)})")
        for out, shape in shapes.items():
            if out in result and result[out].shape != tuple(shape):
                raise CloudFailure(
                    "wrong_shape", f"output {out!r} has shape {result[out].shape}, expected {tuple(shape)}"
                )
        return result

    def ready(self, timeout_s: float | None = None) -> bool:
        """``GET .../ready``: whether the cloud says the model is ready (never raises)."""
        try:
            resp = self.http.get(
                self.ready_url, headers=self.headers, timeout=httpx.Timeout(timeout_s or self.timeout_s)
            )
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    def close(self) -> None:
        self.http.close()


def _version_of(doc: Mapping[str, Any]) -> str | None:
    v = doc.get("model_version")
    return str(v) if isinstance(v, str | int) and not isinstance(v, bool) else None


def _error_text(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"][:200]
    except (ValueError, UnicodeDecodeError, RecursionError):
        pass
    return raw[:200].decode("utf-8", "replace")
