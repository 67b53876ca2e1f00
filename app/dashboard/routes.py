"""Routes of the dashboard: one HTML shell for every page (the script routes on the path) and
its static files. Not part of the API's OpenAPI document."""

from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/dashboard"

# Everything the page loads comes from this service; no inline script or style, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                               "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@lru_cache(maxsize=1)
def _shell() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


def _page(request: Request) -> HTMLResponse:
    # The root path (behind a proxy that mounts the service under a prefix) is where the /v1 API
    # and the static files are; the script reads it from <body data-root>.
    root = html.escape(request.scope.get("root_path", "").rstrip("/"), quote=True)
    return HTMLResponse(_shell().replace("__ROOT__", root), headers=SECURITY_HEADERS)


@router.get("")
def dashboard(request: Request) -> HTMLResponse:
    return _page(request)


@router.get("/")
def dashboard_slash(request: Request) -> RedirectResponse:
    return RedirectResponse(request.scope.get("root_path", "") + PREFIX, status_code=308)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> HTMLResponse:
    return _page(request)


@router.get("/models")
def models_page(request: Request) -> HTMLResponse:
    return _page(request)


@router.get("/models/{model_id}")
def model_page(request: Request, model_id: str) -> HTMLResponse:
    return _page(request)


def install(app: FastAPI) -> None:
    """Serve the dashboard from ``app``: the pages, and /dashboard/static/ for its script and style."""
    app.include_router(router)
    app.mount(PREFIX + "/static", StaticFiles(directory=STATIC), name="dashboard-static")
