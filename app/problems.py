"""API errors whose response carries headers, still RFC 9457 problem+json bodies.

    ApiError (app/errors.py)
    └── HeaderedError        headers sent with the problem
        ├── Unauthorized     401  WWW-Authenticate: Bearer …
        ├── InFlight         409  Retry-After (an Idempotency-Key whose first request still runs)
        └── TooManyRequests  429  Retry-After

app/errors.py's handler sends no headers; :func:`install_headered_errors` registers a
handler for this subclass (Starlette picks the most specific class), so everything
else about the body stays as app/errors.py makes it.
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from .errors import ApiError, problem_response

__all__ = ["HeaderedError", "Unauthorized", "InFlight", "TooManyRequests", "install_headered_errors"]


class HeaderedError(ApiError):
    def __init__(self, detail: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, **extra):
        super().__init__(detail, param=param, code=code, **extra)
        self.headers = headers or {}


class Unauthorized(HeaderedError):
    status, code = 401, "unauthorized"


class InFlight(HeaderedError):
    status, code = 409, "idempotency_key_in_use"


class TooManyRequests(HeaderedError):
    status, code = 429, "too_many_requests"


def install_headered_errors(app: FastAPI) -> None:
    @app.exception_handler(HeaderedError)
    async def _headered_error(request: Request, exc: HeaderedError):
        response = problem_response(exc.status, exc.code, exc.detail, request.url.path, exc.param, **exc.extra)
        response.headers.update(exc.headers)
        return response
