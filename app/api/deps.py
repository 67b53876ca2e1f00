"""Annotated dependency aliases for the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from ..db import get_session
from ..tables import DEFAULT_TENANT


def current_tenant() -> str:
    """Every resource belongs to a tenant; API keys will map to tenants here."""
    return DEFAULT_TENANT


# scope="function": commit before the response is sent, so a client that gets a 201 can
# use the new id at once (the default "request" scope commits after the response).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
CurrentTenant = Annotated[str, Depends(current_tenant)]
