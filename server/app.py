"""The FastAPI application: ``create_app(settings)``.

The lifespan opens the :class:`~server.context.ServerContext` (database, CA, director, image
repository) and runs the background jobs: re-signing online TUF metadata and the broker's CRL before
they expire, and folding old health windows into rollups (:mod:`server.health.rollup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from server.catalog.signing import reconcile_published
from server.config import Settings
from server.context import ServerContext
from server.devices.crl import PublishedCrl, refresh_broker_crl
from server.gctune import tune_gc
from server.health.rollup import HealthRollupJob
from server.http.bodylimit import BodyLimitMiddleware, body_limits
from server.http.errors import ERROR_RESPONSES, install_error_handlers
from server.http.ratelimit import RateLimitMiddleware, rate_rules
from server.http.routers import admin, catalog, devices, examples, fleet, rollouts, signing, tuf
from server.migrate import head_revisions
from server.mqtt.control import LocalBroker
from server.mqtt.runtime import MqttRuntime
from server.readiness import Readiness, check_ready
from server.rollouts.engine import RolloutEngine
from server.ui import operate as ui_operate
from server.ui import routes as ui
from server.ui.common import STATIC_DIR as UI_STATIC_DIR

log = logging.getLogger(__name__)


async def _refresh_metadata_forever(ctx: ServerContext) -> None:
    """Keep timestamp/snapshot (and targets, when its key is online) from expiring, and the
    broker's CRL too (re-issued from the database once less than half its validity is left:
    past its nextUpdate the broker refuses every TLS handshake)."""
    interval = ctx.settings.metadata_refresh_interval_s
    while True:
        try:
            refreshed = await asyncio.to_thread(ctx.repo.refresh_expiring)
            if refreshed:
                log.info("re-signed TUF metadata: %s", ", ".join(refreshed))
            # staged pushes the returning key published, or a signature whose commit failed;
            # revoked files are only swept when targets changed
            await asyncio.to_thread(_reconcile_catalog, ctx, "targets" in refreshed)
        except Exception:
            log.exception("re-signing TUF metadata failed; retrying in %.0fs", interval)
        try:
            await asyncio.to_thread(refresh_broker_crl, ctx)
        except Exception:
            log.exception("re-issuing the broker CRL failed; retrying in %.0fs", interval)
        await asyncio.sleep(interval)


def _reconcile_catalog(ctx: ServerContext, purge_revoked: bool = True) -> None:
    """The catalog in line with the signed targets metadata (server/catalog/signing.py)."""
    with ctx.db.session_scope() as session:
        reconcile_published(session, ctx.repo, purge_revoked=purge_revoked)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = await asyncio.to_thread(ServerContext.open, settings)
        ctx.broker = LocalBroker(settings, ctx.ca)  # a decommission reloads the CRL, cuts the device
        app.state.ctx = ctx
        app.state.crl = PublishedCrl(ctx)
        app.state.migration_heads = head_revisions()  # what /readyz expects the database at
        # the CRL the broker loads, from the database's revocations (before MQTT connects: a stale
        # one past its nextUpdate would refuse the server's own handshake)
        try:
            await asyncio.to_thread(refresh_broker_crl, ctx)
        except Exception:
            log.exception("writing the broker CRL failed; the refresh job retries")
        try:  # repairs a crash between publishing signed targets and recording it
            await asyncio.to_thread(_reconcile_catalog, ctx)
        except Exception:
            log.exception("reconciling the catalog with the signed targets failed")
        app.state.mqtt = MqttRuntime.start(ctx) if settings.mqtt_enabled else None
        app.state.engine = RolloutEngine(ctx, settings.rollout_tick_s) if settings.rollout_engine else None
        if app.state.engine is not None:
            app.state.engine.start()
        app.state.health_rollup = HealthRollupJob(ctx.db, settings)
        app.state.health_rollup.start()
        # keep a strong reference: the event loop holds tasks only weakly
        app.state.tasks = {asyncio.create_task(_refresh_metadata_forever(ctx), name="tuf-refresh")}
        if settings.gc_tuning:
            tune_gc()  # start-up state is built: never walk it again (server/gctune.py)
        try:
            yield
        finally:
            for task in app.state.tasks:
                task.cancel()
            await asyncio.gather(*app.state.tasks, return_exceptions=True)
            await asyncio.to_thread(app.state.health_rollup.stop)
            if app.state.engine is not None:
                await asyncio.to_thread(app.state.engine.stop)
            if app.state.mqtt is not None:
                await asyncio.to_thread(app.state.mqtt.stop)
            ctx.close()

    app = FastAPI(
        title="fleetota control server",
        version="0.1.0",
        description="Signed model bundles, device registry and staged rollouts for edge ML fleets.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # outermost last: a rate-limited request is refused before its body cap is even looked at
    app.add_middleware(BodyLimitMiddleware, limits=body_limits(settings))
    app.add_middleware(RateLimitMiddleware, rules=rate_rules(settings))
    for module in (admin, devices, catalog, examples, signing, rollouts, fleet, tuf):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    # the dashboard (server/ui/): its static files first, or its catch-all 404 page would shadow them
    app.mount("/ui/static", StaticFiles(directory=UI_STATIC_DIR), name="ui-static")
    app.include_router(ui_operate.router)
    app.include_router(ui.router)

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers (nothing else is checked)."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["meta"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready: `not_ready` names the checks"}},
    )
    def readyz(request: Request) -> JSONResponse:
        """Readiness: the database answers, its schema is at the newest migration, (with MQTT on)
        every MQTT link is connected, and the embedded cloud tier (when there is one) runs and
        answers (`checks.cloud.ready` says whether its models serve); 503 otherwise, naming what
        is not ready."""
        state = request.app.state
        cloud = getattr(state, "cloud", None)
        result = check_ready(
            state.ctx.db, state.migration_heads, state.mqtt, cloud.check() if cloud is not None else None
        )
        return JSONResponse(result.model_dump(), status_code=200 if result.status == "ready" else 503)

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse)
    def metrics(request: Request) -> str:
        """Prometheus text format: MQTT messages received, rejected (by kind and reason), published;
        MQTT connection failures (by link and reason)."""
        return request.app.state.ctx.metrics.render()

    return app
