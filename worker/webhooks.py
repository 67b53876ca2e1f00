"""The webhook delivery task: one signed attempt at one message. Retries are not Celery retries: the
delivery row holds the next due time and the reconciler publishes it then (a day of backoff never sits
in the broker or in a worker's memory)."""

from app.services.webhooks import DELIVER_TASK, deliver_once

from .celery_app import celery_app


# Acked on receipt: the database row, not the message, is the truth; a lost attempt is re-sent by the
# reconciler once its lease runs out; DISTILL_WEBHOOK_TIMEOUT_S bounds the HTTP call.
@celery_app.task(name=DELIVER_TASK, acks_late=False, ignore_result=True)
def deliver_webhook(delivery_id: str) -> None:
    deliver_once(delivery_id)
