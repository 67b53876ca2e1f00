"""The API: ``uvicorn app.main:app``. OpenAPI docs at /docs."""

from __future__ import annotations

import logging
import os

# Models load from local files only; the service never reaches out to a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from fastapi import Depends, FastAPI  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.exc import DBAPIError  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api.deps import current_tenant
from .api.hot import HotPaths
from .api.routes import completions, files, jobs, models, webhooks
from .config import get_settings
from .db import get_engine
from .errors import PayloadTooLarge, install_error_handlers, problem_response
from .schemas import Health
from .services import readiness
from . import openapi

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class BodyTooLarge(PayloadTooLarge, StarletteHTTPException):
    """A body found too large while it streams in (chunked, no Content-Length). It is an HTTPException
    too, so FastAPI's body parsing re-raises it rather than turning it into "400 error parsing the body";
    the ApiError handler (first in the MRO) then answers the same 413 as the Content-Length check."""

    def __init__(self, max_bytes: int):
        PayloadTooLarge.__init__(self, f"the request body is larger than the {max_bytes}-byte upload limit",
                                 param="file")
        StarletteHTTPException.__init__(self, 413, self.detail)


class LimitBodySize:
    """Refuse request bodies over the upload limit with 413 before they are spooled to disk:
    by Content-Length when it is given, by counting the bytes when it is not."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes + 64 * 1024  # room for the multipart envelope around the file
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, send)
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        response = problem_response(413, "payload_too_large",
                                    f"the request body is larger than the {self.max_bytes}-byte upload limit",
                                    scope["path"], "file")
        await response(scope, None, send)


def _freeze_startup_objects() -> None:
    """Move everything alive at startup (torch, transformers, SQLAlchemy: millions of objects) out of the
    garbage collector's reach: otherwise every full collection walks them all and stalls the event loop
    for 0.5-0.75 s, which set the p99 latency of /predict (benchmarks/bench_predict.py).

    Then collect less often: after the freeze the long-lived generation is small, so CPython's rule
    (a full pass once it grew by a quarter) fired a full collection every few seconds under load,
    each one stalling every request in flight for 20-30 ms (the create + get benchmark,
    benchmarks/bench_api.py). A young generation of 50,000 allocations instead of 700 means fewer
    passes over the requests' live objects."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def create_app() -> FastAPI:
    settings = get_settings()
    # Telemetry off: we export no OpenTelemetry, and its per-request environment lookups cost ~8% of a
    # /predict request's CPU (benchmarks/bench_predict.py).
    app = FastAPI(title="Distillation service", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Turn a trained teacher model into a small, fast student.",
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    openapi.install(app)  # /docs and /redoc from local assets (no CDN); problem+json schemas
    install_error_handlers(app)
    for module in (files, jobs, models, completions, webhooks):
        # Every /v1 route needs an API key, even one that forgets to take CurrentTenant (which each
        # route does, to scope its lookups; FastAPI resolves the dependency once per request).
        app.include_router(module.router, prefix="/v1", dependencies=[Depends(current_tenant)])
    from . import dashboard
    dashboard.install(app)  # /dashboard: the web UI; the page itself needs no key, its /v1 calls send one

    @app.get("/healthz", tags=["health"], response_model=Health)
    def healthz() -> Health:
        """Liveness: the process answers and reaches its database (see /readyz for readiness)."""
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        return Health()

    # Readiness: schema at head, broker up, a worker alive; 503 naming what is missing.

    @app.get("/readyz", tags=["health"], response_model=readiness.ReadinessPublic, responses={
        503: {"model": readiness.ReadinessPublic, "description": "Not ready: each failing check says what is missing"}})
    def readyz():
        ready, checks = readiness.readiness()
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                            status_code=200 if ready else 503)

    app.add_exception_handler(DBAPIError, readiness.database_error_response)  # unmigrated DB -> 503
    app.router.add_event_handler("startup", _freeze_startup_objects)
    app.router.add_event_handler("startup", readiness.start_watcher)  # "no worker seen" events for waiting jobs
    app.router.add_event_handler("shutdown", readiness.stop_watcher)

    # The hot paths of the busiest routes (api.hot), inside the body-size limit; the app's exception handlers
    # answer their errors.
    app.add_middleware(HotPaths, handlers=app.exception_handlers, routes=[
        ("POST", "/v1/distillation/jobs", jobs.create_job_hot_path),
        ("GET", "/v1/distillation/jobs/{job_id}", jobs.get_job_hot_path),
        ("POST", "/v1/models/{model_id}/predict", models.predict_hot_path)])
    app.add_middleware(LimitBodySize, max_bytes=settings.max_upload_bytes)
    return app


app = create_app()
