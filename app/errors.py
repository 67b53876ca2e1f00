"""API errors as RFC 9457 problem details (``application/problem+json``).

    ApiError            status, code, detail, param (+ headers sent with the problem)
    ├── BadRequest      400
    ├── Unauthorized    401  WWW-Authenticate: Bearer …
    ├── NotFound        404  unknown id (or another tenant's)
    ├── Conflict        409  the resource's state forbids it
    │   └── InFlight    409  Retry-After: an Idempotency-Key whose first request still runs
    ├── PayloadTooLarge 413
    ├── Unprocessable   422  the body parsed but a field is wrong (param names it)
    ├── TooManyRequests 429  Retry-After
    └── Unavailable     503  a dependency (the broker) is down

Request-validation errors from pydantic become 422 with every failing field listed
in ``errors`` and the first one in ``param``. Anything else is a 500, which is a bug.

On the OpenAI-shaped routes (``/v1/completions``, ``/v1/chat/completions``, ``GET /v1/models`` and
``/v1/models/{id}``) the problem also carries OpenAI's error object as the extension member
``error``: ``{"message", "type", "param", "code"}`` (RFC 9457 allows extension members), so the
official ``openai`` client, which builds its exception text from ``body["error"]["message"]``,
shows the message (with the param in it) instead of a bare ``Error code: 422``.
"""

from __future__ import annotations

import logging
import re
import sys
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.spec import error_param

__all__ = ["ApiError", "BadRequest", "Unauthorized", "NotFound", "Conflict", "InFlight", "PayloadTooLarge",
           "Unprocessable", "TooManyRequests", "Unavailable", "install_error_handlers", "openai_error",
           "problem_response"]

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, detail: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, **extra):
        super().__init__(detail)
        self.detail = detail
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}
        self.extra = extra


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class InFlight(Conflict):
    status, code = 409, "idempotency_key_in_use"


class TooManyRequests(ApiError):
    status, code = 429, "too_many_requests"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class Unprocessable(ApiError):
    status, code = 422, "invalid_request"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


OPENAI_PATHS = re.compile(r"^/v1/(completions|chat/completions|models(/[^/]+)?)/?$")
"""The routes the official ``openai`` client calls (completions, chat, models.list / models.retrieve)."""


def openai_error(status: int, code: str, detail: str, param: str | None = None) -> dict:
    """OpenAI's error object. The message names the param, as the client shows only the message."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    message = detail if param is None or detail.startswith(f"{param}:") else f"{param}: {detail}"
    return {"message": message, "type": kind, "param": param, "code": code}


def problem_response(status: int, code: str, detail: str, instance: str, param: str | None = None,
                     **extra) -> JSONResponse:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail,
            "instance": instance, "code": code, "param": param, **extra}
    if OPENAI_PATHS.match(instance):
        body["error"] = openai_error(status, code, detail, param)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def _location(error: dict) -> str:
    """('body', 'hyperparameters', 'epochs') -> 'hyperparameters.epochs' (the field as the user wrote it)."""
    if error.get("type") == "json_invalid":  # loc is ('body', <character offset>), not a field
        return "body"
    return error_param(error) or str(error["loc"][0] if error["loc"] else "body")


def _message(error: dict) -> str:
    if error.get("type") == "json_invalid":  # "JSON decode error" -> say where and why
        return f"invalid JSON at character {error['loc'][-1]}: {(error.get('ctx') or {}).get('error', '')}".rstrip(": ")
    return error["msg"]


def _unreadable_body(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """A body FastAPI could not parse. JSON too deep for the parser (RecursionError) or holding an
    integer over Python's 4300-digit conversion limit (ValueError) is a 422 like any invalid JSON;
    anything else (a malformed multipart form, say) stays a 400. Either way ``param`` is "body"."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        return problem_response(422, "invalid_request", "the JSON body is nested too deeply", request.url.path,
                                "body")
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return problem_response(422, "invalid_request", "the JSON body holds an integer of more than "
                                f"{sys.get_int_max_str_digits()} digits", request.url.path, "body")
    return problem_response(400, "bad_request", str(exc.detail), request.url.path, "body")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        response = problem_response(exc.status, exc.code, exc.detail, request.url.path, exc.param, **exc.extra)
        response.headers.update(exc.headers or {})  # an ApiError that is also an HTTPException may hold None
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = [{"param": _location(e), "message": _message(e)} for e in exc.errors()]
        first = errors[0] if errors else {"param": None, "message": "invalid request"}
        detail = "; ".join(f"{e['param']}: {e['message']}" for e in errors[:5])
        return problem_response(422, "invalid_request", detail, request.url.path, first["param"], errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI / Starlette could not read the request body
            return _unreadable_body(request, exc)
        code = "not_found" if exc.status_code == 404 else "http_error"
        return problem_response(exc.status_code, code, str(exc.detail), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(500, "internal_error", "internal server error (this is a bug)", request.url.path)
