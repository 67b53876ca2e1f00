"""Webhooks: tenants' endpoints, the outbox of deliveries, and one signed delivery attempt.

How an event travels:

1. A job's status changes (running, succeeded, failed, cancelled). In that same transaction
   :func:`job_changed` writes one ``webhook_deliveries`` row per subscribed endpoint (the outbox):
   the status change and its messages commit together or not at all.
2. After the commit, each new row's id is published to Celery (``distill.deliver_webhook``). The
   request path never contacts a receiver; a worker does (:func:`deliver_once`).
3. A worker claims the row (conditional UPDATE: one attempt at a time), logs the attempt, POSTs the
   stored body signed per Standard Webhooks (``webhook-id`` / ``webhook-timestamp`` /
   ``webhook-signature``), and records the outcome: a 2xx ends it; a connection error, timeout or
   non-2xx schedules the next try with exponential backoff, until DISTILL_WEBHOOK_RETRY_WINDOW_S
   (a day) after the event, when the delivery is marked failed.
4. The reconciler publishes rows that are due: retries, and messages lost with a broker or a worker
   (:func:`republish_due`).

Receivers are checked twice for private addresses: at registration and at every delivery, where the
connection goes to the very address that was checked (a name re-pointed at an internal address
between the check and the connection — DNS rebinding — is never contacted).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache

import httpx
from sqlalchemy import event, or_, select, update
from sqlalchemy.orm import Session

from ..config import Settings, get_settings
from ..db import session_scope
from ..errors import NotFound, Unprocessable
from ..schemas import WebhookEndpointCreate
from ..tables import Job, WebhookAttempt, WebhookDelivery, WebhookEndpoint, new_id, utcnow
from .common import is_id, job_public, paginate, shown_id

__all__ = ["DELIVER_TASK", "EVENT_FOR_STATUS", "UrlRefused", "check_url", "sign", "new_secret", "create_endpoint",
           "get_endpoint", "list_endpoints", "delete_endpoint", "list_deliveries", "job_changed", "deliver_once",
           "republish_due", "retry_delay"]

log = logging.getLogger(__name__)

DELIVER_TASK = "distill.deliver_webhook"
EVENT_FOR_STATUS = {"running": "job.running", "succeeded": "job.succeeded", "failed": "job.failed",
                    "cancelled": "job.cancelled"}
RETRY_MULTIPLIERS = (1, 6, 24, 120, 360, 720, 1440, 2880)  # x 5 s: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h
RESPONSE_PREFIX_BYTES = 256  # of a receiver's answer, kept for the attempt log
_PENDING = "webhook_deliveries_to_publish"  # Session.info key: ids published once the transaction commits


# ---- URLs ------------------------------------------------------------------------------------------------------

class UrlRefused(ValueError):
    """A webhook URL the service will not call (scheme, shape, or an address it must not reach)."""


def _parse(url: str) -> httpx.URL:
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UrlRefused("the URL must not contain spaces or control characters")
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise UrlRefused(f"not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise UrlRefused(f"only http and https URLs can receive webhooks, not {parsed.scheme or 'no'} scheme")
    if not parsed.host:
        raise UrlRefused("the URL has no host")
    if port is not None and not 0 < port < 65536:
        raise UrlRefused(f"port {port} is out of range")
    return parsed


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Reachable on the public internet: not private, loopback, link-local, multicast, reserved, unspecified,
    shared (CGNAT) or documentation space. An IPv4 address mapped into IPv6 is judged as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_loopback
                                      or address.is_link_local or address.is_private)


def _resolve(parsed: httpx.URL) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    host = parsed.host
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UrlRefused(f"the host {host!r} does not resolve ({exc})") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


def check_url(url: str, allow_private: bool) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Refuse (UrlRefused) a URL that is not http(s), or whose host resolves to any non-public address
    unless ``allow_private``. Returns the checked addresses (none when private ones are allowed: then
    the name is not looked up, and the connection resolves it as usual)."""
    parsed = _parse(url)
    if allow_private:
        return []
    addresses = _resolve(parsed)
    for address in addresses:
        if not _public(address):
            where = f"{address} is" if parsed.host == str(address) or f"[{address}]" in url \
                else f"the host {parsed.host!r} resolves to {address},"
            raise UrlRefused(f"{where} a private, loopback, link-local, multicast or reserved address; webhooks "
                             "only go to public addresses (DISTILL_WEBHOOKS_ALLOW_PRIVATE=1 lifts this)")
    return addresses


# ---- signing (Standard Webhooks) --------------------------------------------------------------------------------

def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """``webhook-signature``: v1, + base64 HMAC-SHA256 of "{id}.{timestamp}.{body}" keyed by the secret's bytes."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# ---- endpoints --------------------------------------------------------------------------------------------------

def create_endpoint(session: Session, tenant: str, body: WebhookEndpointCreate) -> WebhookEndpoint:
    try:
        check_url(body.url, get_settings().webhooks_allow_private)
    except UrlRefused as exc:
        raise Unprocessable(f"url: {exc}", param="url") from None
    endpoint = WebhookEndpoint(id=new_id("whep"), tenant_id=tenant, url=body.url,
                               events=list(dict.fromkeys(body.events)), description=body.description,
                               secret=new_secret())
    session.add(endpoint)
    session.commit()
    return endpoint


def get_endpoint(session: Session, tenant: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id) if is_id(endpoint_id) else None
    if endpoint is None or endpoint.tenant_id != tenant:
        raise NotFound(f"no webhook endpoint with id {shown_id(endpoint_id)}", param="webhook_id")
    return endpoint


def list_endpoints(session: Session, tenant: str, after: str | None, limit: int):
    query = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant)
    return paginate(session, WebhookEndpoint, query, after, limit, tenant=tenant)


def delete_endpoint(session: Session, tenant: str, endpoint_id: str) -> None:
    """The endpoint goes with its deliveries and their log; pending retries stop."""
    session.delete(get_endpoint(session, tenant, endpoint_id))
    session.commit()


def list_deliveries(session: Session, tenant: str, endpoint_id: str, after: str | None, limit: int):
    """Newest first, each with its attempts (oldest first)."""
    get_endpoint(session, tenant, endpoint_id)
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    rows, has_more = paginate(session, WebhookDelivery, query, after, limit, tenant=tenant)
    attempts: dict[str, list[WebhookAttempt]] = {row.id: [] for row in rows}
    if rows:
        for attempt in session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(attempts)))
                                       .order_by(WebhookAttempt.attempt, WebhookAttempt.id)):
            attempts[attempt.delivery_id].append(attempt)
    return [(row, attempts[row.id]) for row in rows], has_more


# ---- the outbox -------------------------------------------------------------------------------------------------

def _job_data(job: Job) -> dict:
    """The job as GET /v1/distillation/jobs/{id} shows it."""
    return job_public(job).model_dump(mode="json")


def job_changed(session: Session, job_id: str) -> None:
    """Call in the transaction that changed the job's status: queues one message per endpoint of the
    job's tenant subscribed to the new status's event; they are published when the transaction commits."""
    job = session.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).scalar()
    event_type = EVENT_FOR_STATUS.get(job.status) if job is not None else None
    if event_type is None:
        return
    endpoints = [e for e in session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == job.tenant_id))
                 if event_type in e.events]
    if not endpoints:
        return
    now = utcnow()
    body = json.dumps({"type": event_type, "timestamp": now.isoformat().replace("+00:00", "Z"),
                       "data": _job_data(job)}, separators=(",", ":"))
    for endpoint in endpoints:
        delivery = WebhookDelivery(id=new_id("msg"), tenant_id=job.tenant_id, endpoint_id=endpoint.id,
                                   event_type=event_type, job_id=job.id, payload=body, status="pending", attempts=0,
                                   next_attempt_at=now, published_at=now, created_at=now)
        session.add(delivery)
        session.info.setdefault(_PENDING, []).append(delivery.id)


@lru_cache
def _publisher():
    from ..queue import make_celery

    return make_celery()


def publish(delivery_id: str) -> None:
    settings = get_settings()
    _publisher().send_task(DELIVER_TASK, args=[delivery_id], queue=settings.webhook_queue or settings.queue)


@event.listens_for(Session, "after_commit")
def _publish_committed(session: Session) -> None:
    for delivery_id in session.info.pop(_PENDING, ()):
        try:
            publish(delivery_id)
        except Exception:  # the broker is away: the reconciler publishes it once the resend delay has passed
            log.warning("could not publish webhook delivery %s", delivery_id, exc_info=True)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


def republish_due(settings: Settings | None = None) -> list[str]:
    """One reconciler pass: publish every pending delivery that is due and has no message out for that
    due time — retries whose backoff has passed, and messages lost (not claimed within
    DISTILL_QUEUED_RESEND_AFTER_S: a broker hiccup, or a worker that died mid-attempt once its lease ran out).
    Concurrent passes are safe: publishing is a conditional UPDATE only one pass wins."""
    settings = settings or get_settings()
    now = utcnow()
    resend_before = now - timedelta(seconds=settings.queued_resend_after_s)
    due = (WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
           or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now))
    published: list[str] = []
    with session_scope() as session:
        rows = session.execute(select(WebhookDelivery.id, WebhookDelivery.published_at).where(
            *due, or_(WebhookDelivery.published_at.is_(None), WebhookDelivery.published_at < resend_before,
                      WebhookDelivery.published_at < WebhookDelivery.next_attempt_at))).all()
        for delivery_id, published_at in rows:
            same = WebhookDelivery.published_at.is_(None) if published_at is None \
                else WebhookDelivery.published_at == published_at
            if session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, same, *due)
                               .values(published_at=now)).rowcount == 1:
                published.append(delivery_id)
    for delivery_id in published:
        publish(delivery_id)
    return published


# ---- one delivery attempt (worker side) ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Claim:
    delivery_id: str
    attempt: int
    attempt_row: int
    url: str
    secret: str
    payload: str
    created_at: datetime


@dataclass(frozen=True)
class _Outcome:
    status_code: int | None
    error: str | None
    response_body: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def retry_delay(attempts: int, base_s: float) -> float:
    """Seconds from the ``attempts``-th failed try to the next: 1, 6, 24, ... x base (then every 2880 x base)."""
    return RETRY_MULTIPLIERS[min(attempts, len(RETRY_MULTIPLIERS)) - 1] * base_s


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)  # SQLite: naive UTC


def _claim(session: Session, delivery_id: str, settings: Settings) -> _Claim | None:
    """Take the delivery's next attempt (None: not due, in flight elsewhere, done, or gone) and log it."""
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.webhook_timeout_s + 60)
    taken = session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now)).values(
        attempts=WebhookDelivery.attempts + 1, lease_until=lease_until)).rowcount == 1
    if not taken:
        return None
    delivery = session.execute(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                               .execution_options(populate_existing=True)).scalar_one()
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    attempt = WebhookAttempt(delivery_id=delivery_id, attempt=delivery.attempts, started_at=now)
    session.add(attempt)
    session.commit()
    return _Claim(delivery_id, delivery.attempts, attempt.id, endpoint.url, endpoint.secret, delivery.payload,
                  _aware(delivery.created_at))


def _target(url: str, settings: Settings) -> tuple[httpx.URL, dict, dict]:
    """(URL to connect to, extra headers, request extensions): pinned to the address just checked, so the
    connection cannot go anywhere the check did not see (the Host header and TLS name stay the URL's)."""
    parsed = _parse(url)
    addresses = check_url(url, settings.webhooks_allow_private)
    if not addresses:
        return parsed, {}, {}
    extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
    host = parsed.host if parsed.port is None else f"{parsed.host}:{parsed.port}"
    return parsed.copy_with(host=str(addresses[0])), {"Host": host}, extensions


def _send(claim: _Claim, settings: Settings) -> _Outcome:
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "User-Agent": "distill-webhooks/1", "webhook-id": claim.delivery_id,
               "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(claim.secret, claim.delivery_id, timestamp, claim.payload)}
    try:
        url, extra_headers, extensions = _target(claim.url, settings)
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as http:
            with http.stream("POST", url, content=claim.payload.encode(), headers={**headers, **extra_headers},
                             extensions=extensions) as response:
                prefix = b""
                for chunk in response.iter_raw():
                    prefix += chunk
                    if len(prefix) >= RESPONSE_PREFIX_BYTES:
                        break
    except UrlRefused as exc:
        return _Outcome(None, f"refused: {exc}"[:512], None)
    except httpx.TimeoutException:
        return _Outcome(None, f"timed out after {settings.webhook_timeout_s:g} s", None)
    except httpx.HTTPError as exc:
        return _Outcome(None, f"{type(exc).__name__}: {exc}"[:512], None)
    body = prefix[:RESPONSE_PREFIX_BYTES].decode("utf-8", "replace").replace("\x00", "")
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    return _Outcome(response.status_code, error, body)


def _record(session: Session, claim: _Claim, outcome: _Outcome, settings: Settings) -> str:
    """Log the attempt's outcome and settle the delivery: succeeded, failed (retry window over) or the next try."""
    now = utcnow()
    session.execute(update(WebhookAttempt).where(WebhookAttempt.id == claim.attempt_row).values(
        finished_at=now, status_code=outcome.status_code, error=outcome.error, response_body=outcome.response_body))
    next_at = now + timedelta(seconds=retry_delay(claim.attempt, settings.webhook_retry_base_s))
    if outcome.ok:
        values = {"status": "succeeded", "delivered_at": now, "next_attempt_at": None}
    elif next_at > claim.created_at + timedelta(seconds=settings.webhook_retry_window_s):
        values = {"status": "failed", "next_attempt_at": None}
    else:
        values = {"next_attempt_at": next_at}
    session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == claim.delivery_id, WebhookDelivery.attempts == claim.attempt,
        WebhookDelivery.status == "pending").values(lease_until=None, **values))
    session.commit()
    return values.get("status", "pending")


def deliver_once(delivery_id: str) -> str | None:
    """One attempt at a delivery, if it is due: the worker task's body. Returns the delivery's status
    after it (None: nothing to do, e.g. a duplicate message). No transaction is open during the POST."""
    settings = get_settings()
    with session_scope() as session:
        claim = _claim(session, delivery_id, settings)
    if claim is None:
        return None
    outcome = _send(claim, settings)
    with session_scope() as session:
        status = _record(session, claim, outcome, settings)
    log.info("webhook %s attempt %d: %s", delivery_id, claim.attempt, outcome.error or outcome.status_code)
    return status
