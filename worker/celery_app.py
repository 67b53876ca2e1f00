"""The worker: ``celery -A worker.celery_app worker --pool=solo``.

One job per process with the solo pool: the job runs in the worker's main process,
so nothing forks after CUDA is initialised; run one worker per GPU
(``DISTILL_DEVICE=cuda:N``) to scale out. Prefetch 1 and late acks come from
``app.queue.celery_config``.
"""

import os

# Models load from local files only; a worker never reaches out to a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from celery import signals  # noqa: E402

from app.config import get_settings  # noqa: E402
from app.queue import make_celery  # noqa: E402

# A worker frozen mid-transaction must not keep the reconciler off its job's row for longer
# than the heartbeat timeout it is judged by.
if get_settings().database_idle_transaction_timeout_s is None:
    get_settings().database_idle_transaction_timeout_s = max(1.0, get_settings().heartbeat_timeout_s / 2)

celery_app = make_celery()
celery_app.conf.update(worker_pool="solo", worker_concurrency=1, include=["worker.tasks", "worker.webhooks"])
app = celery_app


@signals.worker_ready.connect
def _start_reconciler(**_) -> None:
    from . import reconciler

    reconciler.start()


@signals.worker_shutting_down.connect
def _hand_jobs_back(**_) -> None:
    """SIGTERM (a deploy): the running job checkpoints and goes back to the queue, and the
    process exits within DISTILL_SHUTDOWN_GRACE_S even if the job can't stop in time (its
    lease then expires and the reconciler re-queues it from its last checkpoint)."""
    import os
    import threading

    from app.config import get_settings

    from . import reconciler, runner

    runner.request_shutdown()
    reconciler.stop()
    grace = get_settings().shutdown_grace_s
    watchdog = threading.Timer(grace, lambda: os._exit(1))
    watchdog.daemon = True  # a clean exit before the grace is up must not wait for it
    watchdog.start()
