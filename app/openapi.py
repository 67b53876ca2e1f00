"""The OpenAPI document's shared parts, and the docs pages that read it.

- ``errors(404, 409, ...)``: the ``responses=`` of a route, every error it can answer as
  ``application/problem+json`` with the :class:`~app.schemas.Problem` schema and an example.
  401 (no or a bad API key) and 422 (a parameter or body field is wrong) come with every
  /v1 operation; the others are named per route.
- ``install(app)``: adds Problem to the document's components (FastAPI only collects the
  schemas of ``model=`` responses, which it would file under application/json) and serves
  ``/docs`` (Swagger UI) and ``/redoc`` with their JavaScript and CSS from this service:
  the assets ship in the ``fastapi-offline`` wheel, so the pages work with no internet.
"""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema

from .errors import PROBLEM_JSON
from .schemas import Problem

__all__ = ["errors", "event_stream", "install", "DOCS_ASSETS_URL", "BINARY", "HTML"]

DOCS_ASSETS_URL = "/docs-assets"
# swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png (Swagger UI: Apache-2.0,
# ReDoc: MIT; the package: MIT, its LICENSE in its dist-info).
_ASSETS = Path(fastapi_offline.__file__).parent / "static"

# status -> (code, detail, param, what it means on an operation)
_EXAMPLES: dict[int, tuple[str, str, str | None, str]] = {
    400: ("bad_request", "There was an error parsing the body", "body", "The request body could not be read"),
    401: ("unauthorized", "the API key is invalid or has been revoked", "Authorization",
          "No API key, or one that is unknown or revoked"),
    404: ("not_found", "no distillation job with id 'job-0123456789abcdef01234567'", "job_id",
          "No such id (or it is another tenant's)"),
    409: ("conflict", "job 'job-0123456789abcdef01234567' has already finished (succeeded)", "job_id",
          "The resource's state forbids it (or an Idempotency-Key's first request is still running)"),
    413: ("payload_too_large", "the file is larger than the 2147483648-byte upload limit", "file",
          "Over the upload limit or the tenant's storage quota"),
    422: ("invalid_request", "hyperparameters.epochs: Input should be greater than or equal to 1",
          "hyperparameters.epochs", "A parameter or body field is wrong: param names it"),
    429: ("too_many_requests", "this tenant has 8 queued or running jobs; the limit is 8", None,
          "The tenant's limit of queued and running jobs is reached (Retry-After)"),
    503: ("unavailable", "the job queue is unavailable; job job-0123456789abcdef01234567 was marked failed", None,
          "A dependency (database, broker) is unavailable"),
}


def problem_example(status: int, instance: str = "/v1/distillation/jobs/job-0123456789abcdef01234567") -> dict:
    code, detail, param, _ = _EXAMPLES[status]
    example = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail,
               "instance": instance, "code": code, "param": param}
    if status == 422:
        example["errors"] = [{"param": param, "message": "Input should be greater than or equal to 1"}]
    return example


def _problem(status: int) -> dict:
    return {"description": _EXAMPLES[status][3], "content": {PROBLEM_JSON: {
        "schema": {"$ref": "#/components/schemas/Problem"}, "example": problem_example(status)}}}


def errors(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` for a /v1 route: 401 and 422 always, plus the given statuses."""
    return {status: _problem(status) for status in sorted({401, 422, *statuses})}


def event_stream(data_schema: str, example: str, description: str) -> dict:
    """A ``text/event-stream`` body. Its schema describes one event as clients (and Schemathesis)
    parse it: ``id``, ``event``, ``retry`` and ``data``, a JSON text of the named component schema
    (or ``[DONE]``); OpenAPI 3.1 has no per-event schema of its own."""
    event = {"type": "object", "properties": {
        "id": {"type": "string"}, "event": {"type": "string"}, "retry": {"type": "integer"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": f"#/components/schemas/{data_schema}"}}}}
    return {"description": description, "content": {"text/event-stream": {"schema": event, "example": example}}}


BINARY = {"description": "The file's bytes", "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}
HTML = {"description": "An HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}


def _with_problem_schemas(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = generate()  # FastAPI caches it in app.openapi_schema: extend it in place, once
            _, definitions = models_json_schema([(Problem, "serialization")],
                                                ref_template="#/components/schemas/{model}")
            document.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        return app.openapi_schema

    app.openapi = openapi


def _docs_pages(app: FastAPI) -> None:
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=_ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "") + DOCS_ASSETS_URL
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + app.openapi_url,
                                   title=f"{app.title} - Swagger UI", swagger_js_url=f"{root}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/swagger-ui.css", swagger_favicon_url=f"{root}/favicon.png",
                                   swagger_ui_parameters=app.swagger_ui_parameters)

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "") + DOCS_ASSETS_URL
        return get_redoc_html(openapi_url=request.scope.get("root_path", "") + app.openapi_url,
                              title=f"{app.title} - ReDoc", redoc_js_url=f"{root}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}/favicon.png", with_google_fonts=False)


def install(app: FastAPI) -> None:
    """Call with an app made with ``docs_url=None, redoc_url=None`` (FastAPI's own pages use a CDN)."""
    _with_problem_schemas(app)
    _docs_pages(app)
