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

from app.queue import make_celery  # noqa: E402

celery_app = make_celery()
celery_app.conf.update(worker_pool="solo", worker_concurrency=1, include=["worker.tasks"])
app = celery_app
