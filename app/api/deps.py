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


SessionDep = Annotated[Session, Depends(get_session)]
CurrentTenant = Annotated[str, Depends(current_tenant)]
