"""OpenAI-compatible generation: the official OpenAI client works with base_url=<service>/v1.

Errors on these routes carry OpenAI's ``{"error": {...}}`` object besides the problem details
(see app/errors.py). ``"stream": true`` answers ``text/event-stream`` in OpenAI's chunk format.

Concurrent requests for one model are generated together (app/services/generation.py): their sequences
(prompts x n) form batches of at most DISTILL_GENERATE_MAX_BATCH rows, waiting at most
DISTILL_GENERATE_MAX_WAIT_MS for one to fill; past DISTILL_GENERATE_MAX_QUEUE waiting sequences a
request gets 503 with Retry-After."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from ...openapi import errors
from ...schemas import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from ...services import completions as service
from ...services.models import get_model
from ..deps import CurrentTenant, SessionDep

router = APIRouter(tags=["completions"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _stream_doc(chunk: str) -> dict:
    return {200: {"content": {"text/event-stream": {
        "schema": {"type": "string"},
        "example": f'data: {{"object": "{chunk}", ...}}\n\ndata: [DONE]\n\n'}},
        "description": f"The result; with stream=true, Server-Sent Events of {chunk} objects ending with "
                       "`data: [DONE]`"}}


def _respond(result) -> Any:
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/completions", response_model=Completion, responses={**_stream_doc("text_completion"), **errors(400, 404, 503)})
def create_completion(session: SessionDep, tenant: CurrentTenant, body: CompletionRequest) -> Any:
    return _respond(service.complete(get_model(session, tenant, body.model, param="model"), body))


@router.post("/chat/completions", response_model=ChatCompletion, responses={**_stream_doc("chat.completion.chunk"), **errors(400, 404, 503)})
def create_chat_completion(session: SessionDep, tenant: CurrentTenant, body: ChatCompletionRequest) -> Any:
    return _respond(service.chat(get_model(session, tenant, body.model, param="model"), body))
