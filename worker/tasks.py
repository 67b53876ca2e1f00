"""Tasks: policy in the decorator, a body that takes an id and calls a plain function."""

from app.queue import RUN_JOB_TASK

from .celery_app import celery_app
from .runner import execute_job


@celery_app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> None:
    execute_job(job_id)
