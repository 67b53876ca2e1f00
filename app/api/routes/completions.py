"""OpenAI-compatible generation: the official OpenAI client works with base_url=<service>/v1."""

from __future__ import annotations

from fastapi import APIRouter

from ...schemas import ChatCompletionRequest, CompletionRequest
from ...services import completions as service
from ...services.models import get_model
from ..deps import CurrentTenant, SessionDep

router = APIRouter(tags=["completions"])


@router.post("/completions")
def create_completion(session: SessionDep, tenant: CurrentTenant, body: CompletionRequest) -> dict:
    return service.complete(get_model(session, tenant, body.model, param="model"), body)


@router.post("/chat/completions")
def create_chat_completion(session: SessionDep, tenant: CurrentTenant, body: ChatCompletionRequest) -> dict:
    return service.chat(get_model(session, tenant, body.model, param="model"), body)
