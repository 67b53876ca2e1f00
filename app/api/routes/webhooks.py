"""Webhook endpoints: register (the signing secret is shown once), list, read, delete, and the delivery log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from ...openapi import errors
from ...schemas import (ID_PATTERN, Deleted, WebhookAttemptPublic, WebhookDeliveriesPublic, WebhookDeliveryPublic,
                        WebhookEndpointCreate, WebhookEndpointCreated, WebhookEndpointPublic, WebhookEndpointsPublic)
from ...services import webhooks as service
from ...services.common import page, unix
from ...tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from ..deps import CurrentTenant, SessionDep
from ..params import Cursor

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

WebhookId = Annotated[str, Path(pattern=ID_PATTERN, description="A webhook endpoint id (whep-…)")]


def public(endpoint: WebhookEndpoint) -> WebhookEndpointPublic:
    return WebhookEndpointPublic(id=endpoint.id, url=endpoint.url, events=endpoint.events,
                                 description=endpoint.description, created_at=unix(endpoint.created_at))


def public_attempt(attempt: WebhookAttempt) -> WebhookAttemptPublic:
    return WebhookAttemptPublic(attempt=attempt.attempt, started_at=unix(attempt.started_at),
                                finished_at=unix(attempt.finished_at), status_code=attempt.status_code,
                                error=attempt.error, response_body=attempt.response_body)


def public_delivery(delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> WebhookDeliveryPublic:
    pending = delivery.status == "pending"
    return WebhookDeliveryPublic(id=delivery.id, endpoint_id=delivery.endpoint_id, event_type=delivery.event_type,
                                 job_id=delivery.job_id, status=delivery.status, created_at=unix(delivery.created_at),
                                 delivered_at=unix(delivery.delivered_at),
                                 next_attempt_at=unix(delivery.next_attempt_at) if pending else None,
                                 attempts=[public_attempt(a) for a in attempts])


@router.post("", status_code=201, response_model=WebhookEndpointCreated, responses=errors(400))
def create_endpoint(session: SessionDep, tenant: CurrentTenant, body: WebhookEndpointCreate) -> WebhookEndpointCreated:
    """Register a receiver for job events. The response holds the signing ``secret``, shown only here."""
    endpoint = service.create_endpoint(session, tenant, body)
    return WebhookEndpointCreated(**public(endpoint).model_dump(), secret=endpoint.secret)


@router.get("", response_model=WebhookEndpointsPublic, responses=errors())
def list_endpoints(session: SessionDep, tenant: CurrentTenant, after: Cursor = None,
                   limit: Annotated[int, Query()] = 20) -> WebhookEndpointsPublic:
    rows, has_more = service.list_endpoints(session, tenant, after, limit)
    return WebhookEndpointsPublic(**page([public(r) for r in rows], has_more))


@router.get("/{webhook_id}", response_model=WebhookEndpointPublic, responses=errors(404))
def get_endpoint(session: SessionDep, tenant: CurrentTenant, webhook_id: WebhookId) -> WebhookEndpointPublic:
    return public(service.get_endpoint(session, tenant, webhook_id))


@router.delete("/{webhook_id}", response_model=Deleted, responses=errors(404))
def delete_endpoint(session: SessionDep, tenant: CurrentTenant, webhook_id: WebhookId) -> Deleted:
    """Delete the endpoint with its delivery log; pending retries stop."""
    service.delete_endpoint(session, tenant, webhook_id)
    return Deleted(id=webhook_id, object="webhook_endpoint")


@router.get("/{webhook_id}/deliveries", response_model=WebhookDeliveriesPublic, responses=errors(404))
def list_deliveries(session: SessionDep, tenant: CurrentTenant, webhook_id: WebhookId, after: Cursor = None,
                    limit: Annotated[int, Query()] = 20) -> WebhookDeliveriesPublic:
    """Messages sent to this endpoint, newest first, each with every attempt (status code or error, times)
    and when the next retry is due."""
    rows, has_more = service.list_deliveries(session, tenant, webhook_id, after, limit)
    return WebhookDeliveriesPublic(**page([public_delivery(d, a) for d, a in rows], has_more))
