"""The Open Inference Protocol (KServe V2) REST endpoints of the cloud tier (:func:`create_cloud_app`).

Public: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready`` (503 until every
configured model serves) and ``/metrics``. A device (certificate or token) may ask
``GET /v2/models/{name}[/versions/{v}]`` (metadata), ``.../ready``, and ``POST .../infer``. An
infer request is authenticated, rate-limited per device (429), capped in size (413), parsed (400),
checked against the model (400), admitted to the bounded queue (503) and answered from a batch.
Errors are ``{"error": "..."}``; answers about a model carry ``X-Fleet-Model(-Version)`` headers."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from device_client.runtime import LoadedModel
from server.cloud.errors import BadRequest, OipError, TooLarge
from server.cloud.service import CloudService
from server.cloud.tensors import (
    InferRequest,
    datatype_of,
    encode_infer_response,
    metadata_shape,
    parse_infer_request,
)

SERVER_NAME = "fleetota-cloud"
EXTENSIONS = ["binary_tensor_data"]
#: bodies above this are parsed on a worker thread rather than on the event loop
PARSE_INLINE_BYTES = 64 * 1024


def model_headers(model: LoadedModel) -> dict[str, str]:
    return {"X-Fleet-Model": model.name, "X-Fleet-Model-Version": model.version}


def _error(exc: OipError) -> JSONResponse:
    headers = exc.headers()
    if isinstance(exc, TooLarge):
        headers["Connection"] = "close"  # the unread body makes the connection unusable
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


def _client_certificate(request: Request) -> bytes | None:
    """The verified client certificate (DER) of an mTLS connection, from the ASGI TLS extension
    that :mod:`server.cloud.tls` fills in."""
    chain = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_chain")
    if not chain:
        return None
    return ssl.PEM_cert_to_DER_cert(chain[0])


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (a declared length before reading a byte)."""
    declared = request.headers.get("content-length")
    too_large = f"request body exceeds the limit of {limit} bytes (FLEET_CLOUD_MAX_BODY_BYTES)"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(too_large)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise TooLarge(too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def _tensor_metadata(model: LoadedModel, which: str) -> list[dict[str, Any]]:
    specs = model.manifest.inputs if which == "inputs" else model.manifest.outputs
    return [
        {"name": s.name, "datatype": datatype_of(s.dtype), "shape": metadata_shape(s.shape)} for s in specs
    ]


def create_cloud_app(service: CloudService) -> FastAPI:
    """The app; its lifespan starts and stops ``service``'s threads."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="fleetota cloud tier (Open Inference Protocol v2)",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.cloud = service
    limit = service.settings.cloud_max_body_bytes
    metrics = service.metrics

    @app.exception_handler(OipError)
    async def oip_error(request: Request, exc: OipError) -> JSONResponse:
        metrics.error(exc.reason)
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    async def parse(request: Request, model: LoadedModel) -> InferRequest:
        """The request's body read under its cap, parsed, and checked against ``model`` (400/413)."""
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise BadRequest(f"Content-Encoding {encoding!r} is not supported: send the body uncompressed")
        body = await _read_body(request, limit)
        header = request.headers.get("inference-header-content-length")
        if header is not None and not header.isdigit():
            raise BadRequest("Inference-Header-Content-Length must be a number of bytes")
        length = int(header) if header is not None else None
        if len(body) > PARSE_INLINE_BYTES:
            parsed = await run_in_threadpool(parse_infer_request, body, length)
        else:
            parsed = parse_infer_request(body, length)
        service.check_inputs(model, parsed.inputs, parsed.datatypes)
        for out in parsed.outputs or ():
            if out.name not in model.output_names:
                raise BadRequest(
                    f"model {model.name} has no output {out.name!r} (it has {list(model.output_names)})"
                )
        return parsed

    async def caller_model(request: Request, name: str, version: str | None) -> LoadedModel:
        await run_in_threadpool(service.authenticate, _bearer(request), _client_certificate(request))
        return service.model(name, version)

    @app.get("/v2")
    def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": "2", "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready() -> JSONResponse:
        ok, detail = service.readiness()
        if ok:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": detail}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        return service.render_metrics()

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request, name: str) -> JSONResponse:
        model = await caller_model(request, name, request.path_params.get("version"))
        served = service.registry.get(name)
        versions = [m.version for m in served.versions()] if served is not None else [model.version]
        body = {
            "name": name,
            "versions": versions,
            "platform": "onnxruntime_onnx",
            "inputs": _tensor_metadata(model, "inputs"),
            "outputs": _tensor_metadata(model, "outputs"),
        }
        return JSONResponse(body, headers=model_headers(model))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str) -> JSONResponse:
        model = await caller_model(request, name, request.path_params.get("version"))
        body = {"name": name, "version": model.version, "ready": True}
        return JSONResponse(body, headers=model_headers(model))

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str) -> Response:
        started = time.perf_counter()
        version = request.path_params.get("version")
        label = name if name in service.model_names else "-"  # no label per made-up name
        try:
            caller = await run_in_threadpool(
                service.authenticate, _bearer(request), _client_certificate(request)
            )
            service.admit(caller)
            model = service.model(name, version)
            service.enter()
            future = None
            try:
                parsed = await parse(request, model)
                future = service.submit(model, parsed.inputs)
            finally:
                if future is None:  # refused before it reached the batcher
                    service.leave()
            outputs = await asyncio.wrap_future(future)
            if parsed.collect:  # after the answer is computed, before it is sent: off the batch path
                await run_in_threadpool(service.keep_example, caller, model, parsed.inputs, outputs)
            content, header_length = encode_infer_response(
                model.name, model.version, parsed.id, outputs, parsed.outputs, parsed.binary_outputs
            )
        except OipError as exc:
            metrics.error(exc.reason)
            metrics.request(label, exc.status, time.perf_counter() - started if exc.status == 500 else None)
            return _error(exc)
        metrics.request(label, 200, time.perf_counter() - started)
        headers = model_headers(model)
        if header_length is None:
            return Response(content, media_type="application/json", headers=headers)
        headers["Inference-Header-Content-Length"] = str(header_length)
        return Response(content, media_type="application/octet-stream", headers=headers)

    return app
