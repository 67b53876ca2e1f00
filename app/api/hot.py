"""Hot paths: the common case of a busy route answered before FastAPI solves its dependencies.

Issue 9 measured the API's create + get at 64 concurrent clients: FastAPI's per-request machinery
(dependency solving, parameter and body validation, response-model validation and serialization)
cost more CPU than the work of the request. A route built with :func:`hot_path_route` first calls
its hot path, which answers the request only in the case it is written for (a repeat client whose
API key this process has cached, a well-formed request) and returns None for anything else; the
full FastAPI endpoint, the reference that handles every case and documents the route, then answers
it unchanged (a 401, a 422 naming the field, a 404)."""

from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from ..services.api_keys import cached_tenant

__all__ = ["HotPath", "hot_path_route", "cached_request_tenant", "is_json"]

HotPath = Callable[[Request], Awaitable[Response | None]]


def hot_path_route(hot_path: HotPath) -> type[APIRoute]:
    """An APIRoute class whose handler tries ``hot_path`` first (pass it as ``route_class_override``)."""

    class HotPathRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            full = super().get_route_handler()

            async def handler(request: Request) -> Response:
                return await hot_path(request) or await full(request)

            return handler

    HotPathRoute.__name__ = HotPathRoute.__qualname__ = f"HotPathRoute[{hot_path.__name__}]"
    return HotPathRoute


def cached_request_tenant(request: Request) -> str | None:
    """The tenant of the request's ``Authorization: Bearer`` key if this process found the key valid
    moments ago (``api_keys.cached_tenant``); None means "let the full route authenticate"."""
    scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
    return cached_tenant(key.strip()) if scheme.lower() == "bearer" else None


def is_json(request: Request) -> bool:
    """Whether the body is declared ``application/json`` (the only body a hot path parses)."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower() == "application/json"
