"""Annotated dependency aliases for the routes.

``current_tenant`` runs on every /v1 request, so it is async and cheap when it can be: a key this
process found valid moments ago is answered from memory (``api_keys.tenant_of``); only a key it
has not seen lately goes to the database, in a worker thread with a session of its own (the route's
``SessionDep``, when it has one, is not opened for authentication).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from ..db import get_session
from ..errors import Unauthorized
from ..services import idempotency
from ..services.api_keys import tenant_of

# auto_error=False: a missing or non-Bearer header comes through as None and gets our 401
# (problem+json with WWW-Authenticate) rather than FastAPI's plain 403. Declaring the scheme
# puts it in the OpenAPI document (the "Authorize" button of /docs).
bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dsk_…` "
                                                  "(created with `distill-admin keys create --tenant NAME`)")

# scope="function": commit before the response is sent, so a client that gets a 201 can
# use the new id at once (the default "request" scope commits after the response).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def current_tenant(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The tenant of the request's API key. Missing, malformed, unknown and revoked keys are all
    the same 401: the answer tells nothing about which keys exist."""
    if credentials is None:
        raise Unauthorized("this request needs an API key: send 'Authorization: Bearer <key>'",
                           param="Authorization", headers={"WWW-Authenticate": 'Bearer realm="distill"'})
    tenant = await tenant_of(credentials.credentials)
    if tenant is None:
        raise Unauthorized("the API key is invalid or has been revoked", param="Authorization",
                           headers={"WWW-Authenticate": 'Bearer realm="distill", error="invalid_token"'})
    return tenant


CurrentTenant = Annotated[str, Depends(current_tenant)]


IdempotencyKeyHeader = Annotated[str | None, Header(
    alias=idempotency.HEADER, min_length=1, max_length=255,
    description="Retries with the same key and body within 24 h replay the first response; never a second object")]


async def _body_sha256(request: Request) -> str:
    # FastAPI has already read (and cached) the JSON body by the time dependencies run.
    return idempotency.request_sha256(request.method, request.url.path, await request.body())


RequestSha256 = Annotated[str, Depends(_body_sha256)]
