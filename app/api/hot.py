"""Hot paths: the common case of a busy route answered before FastAPI's machinery.

Issue 9 measured the API's create + get at 64 concurrent clients: the framework's per-request work
(the middleware stack, matching the path against every route, dependency solving, parameter and
body validation, response-model validation and serialization) cost more CPU than the work of the
request. :class:`HotPaths` is an ASGI middleware (inside the body-size limit) holding a few
(method, path pattern, hot path) entries. A hot path answers a request only in the case it is
written for (a repeat client whose API key this process has cached, a well-formed request) and
returns None for anything else; the request then goes on to the app, where the full FastAPI route,
the reference that handles every case and documents the route, answers it unchanged (a 401, a 422
naming the field, a 404). An error a hot path raises (a 422 of a check, a 429, a 503) is answered by
the app's own exception handlers, as if the route had raised it."""

from __future__ import annotations

import re
from typing import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..services.api_keys import cached_tenant

__all__ = ["HotPath", "HotPaths", "cached_request_tenant", "is_json"]

HotPath = Callable[[Request], Awaitable[Response | None]]


class HotPaths:
    """``routes``: (method, path with ``{name}`` segments, hot path); ``handlers``: the app's exception
    handlers (``app.exception_handlers``), looked up by the error's class like Starlette does."""

    def __init__(self, app: ASGIApp, routes: list[tuple[str, str, HotPath]], handlers: dict):
        self.app, self.handlers = app, handlers
        self.routes = [(method, re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"), hot)
                       for method, path, hot in routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for method, pattern, hot in self.routes:
                if scope["method"] == method and (match := pattern.match(scope["path"])):
                    request = Request({**scope, "path_params": match.groupdict()}, receive)
                    try:
                        response = await hot(request)
                    except ClientDisconnect:
                        return
                    except Exception as exc:  # noqa: BLE001 - answered as the route's own error would be
                        response = await self._handle(request, exc)
                    if response is not None:
                        return await response(scope, receive, send)
                    receive = _replaying(request, receive)  # the app reads the body this hot path may have read
                    break
        await self.app(scope, receive, send)

    async def _handle(self, request: Request, exc: Exception) -> Response:
        for cls in type(exc).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                return await handler(request, exc)
        raise exc


def _replaying(request: Request, receive: Receive) -> Receive:
    body = getattr(request, "_body", None)
    if body is None:
        return receive
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # a disconnect, if the client goes

    return replay


def cached_request_tenant(request: Request) -> str | None:
    """The tenant of the request's ``Authorization: Bearer`` key if this process found the key valid
    moments ago (``api_keys.cached_tenant``); None means "let the full route authenticate"."""
    scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
    return cached_tenant(key.strip()) if scheme.lower() == "bearer" else None


def is_json(request: Request) -> bool:
    """Whether the body is declared ``application/json`` (the only body a hot path parses)."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower() == "application/json"
