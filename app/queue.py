"""The broker only carries "job X is ready to run"; the database holds everything else.

One Celery configuration serves both sides: the API publishes with it and the worker
(``worker.celery_app``) consumes with it.

Embedded default: Celery's *filesystem* transport (kombu), a real transport whose
messages are files under ``var/broker``: nothing to install, durable across restarts
of the API and worker, and safe across processes on one machine (it locks each
message file). It is the honest single-machine stand-in for Redis; for workers on
several machines point ``DISTILL_BROKER_URL`` at Redis.

Publishing (the API's submits, the worker's re-sends) goes through one Celery app per process
and its producer pool: broker connections are pooled (``broker_pool_limit``) and reused, never
opened per message. :func:`enqueue_jobs` publishes a batch of submits on one producer. It is
blocking I/O: callers run it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from .config import Settings, get_settings

log = logging.getLogger(__name__)

__all__ = ["celery_config", "make_celery", "enqueue_job", "enqueue_jobs", "RUN_JOB_TASK"]

RUN_JOB_TASK = "distill.run_job"


def celery_config(settings: Settings) -> dict:
    config = {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.queue,
        "task_ignore_result": True,  # results live in the database, not a result backend
        "task_acks_late": True,  # ack after the job ran: a lost worker's job is redelivered...
        "task_reject_on_worker_lost": True,  # ...and its attempts are counted in the database
        "worker_prefetch_multiplier": 1,  # a long job must not hold a second one hostage
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    else:
        # Redis: redeliver an unacked message only after the longest job could have run (by default).
        timeout = settings.broker_visibility_timeout_s or settings.max_job_seconds + 600
        config["broker_transport_options"] = {
            "visibility_timeout": timeout,
            # Look for overdue messages every few seconds, on every look (kombu's default scans
            # one look in ten, every 10 s: a dead worker's job could wait 100 s past the timeout).
            "unacked_restore_interval": max(1, min(10, timeout // 2)),
            "unacked_restore_throttle": 1,
        }
    return config


def make_celery(settings: Settings | None = None) -> Celery:
    celery = Celery("distill")
    celery.conf.update(celery_config(settings or get_settings()))
    return celery


@lru_cache
def _publisher() -> Celery:
    return make_celery()


def enqueue_job(job_id: str) -> None:
    _publisher().send_task(RUN_JOB_TASK, args=[job_id], queue=get_settings().queue)


def enqueue_jobs(job_ids: list[str]) -> dict[str, Exception]:
    """Publish one message per job on one pooled producer; {job id: error} for those that failed.

    As one batch where the broker's transport supports it (kombu's ``Producer.batch``: on Redis one
    pipelined round trip for the lot, instead of a round trip and a client object per message). A
    batch is sent without Celery's publish retries, so if it fails the jobs are published again one
    by one, with them; a message the failed batch did deliver then arrives twice, which the worker's
    lease absorbs (the second copy finds the job claimed), as it does the reconciler's re-sends."""
    if len(job_ids) > 1:
        try:
            celery, queue = _publisher(), get_settings().queue
            with celery.producer_or_acquire() as producer:
                if hasattr(producer, "batch"):
                    declare = _declare(celery, queue, producer)
                    with producer.batch(max_size=2 * len(job_ids) + 8):  # flushed on a clean exit
                        for job_id in job_ids:
                            celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, producer=producer,
                                             declare=declare)
                    return {}
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            log.warning("publishing %d jobs as one batch failed (%s); publishing them one by one", len(job_ids), exc)
    return _enqueue_one_by_one(job_ids)


def _declare(celery: Celery, queue: str, producer) -> list:
    """The queue to declare with each message (Celery's default), bound to the producer's channel once
    per batch: given unbound, kombu copies and binds it for every message before finding it already
    declared on the connection, about a sixth of a publish's CPU (issue 9)."""
    return [celery.amqp.queues[queue].bind(producer.channel)]


def _enqueue_one_by_one(job_ids: list[str]) -> dict[str, Exception]:
    celery, queue, failed = _publisher(), get_settings().queue, {}
    try:
        with celery.producer_or_acquire() as producer:
            for job_id in job_ids:
                if failed:  # the broker refused one (after its retries): don't wait on it again for each
                    failed[job_id] = next(iter(failed.values()))
                    continue
                try:
                    celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, producer=producer)
                except Exception as exc:  # noqa: BLE001 - each job hears of its own failure
                    failed[job_id] = exc
    except Exception as exc:  # noqa: BLE001 - no producer (the broker is down): every job failed
        return {job_id: failed.get(job_id, exc) for job_id in job_ids}
    return failed
