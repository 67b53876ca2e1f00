"""Deleting finished jobs and models, with what they own on disk.

- A job is deleted once it has finished (409 while queued or running: cancel it first). Its
  events go with it, and its work folder (step checkpoints, outputs) under this machine's
  work root. The model it produced stays, its ``job_id`` now null; so do files it generated
  (they are files of their own, deleted through /v1/files).
- A model is deleted unless a queued or running job uses it as teacher or student (409). Its
  storage folder ``models/<id>/`` (weights, Hugging Face directory, download archive, and a
  LoRA student's adapter folder and its archive) goes with it, and any copy loaded in this
  process for serving.

The rows go first (flushed; the request's transaction commits them), then the bytes, as
files.delete_file does: a failure between the two leaves unreferenced bytes, never a row
that points at nothing.
"""

from __future__ import annotations

import shutil

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from .. import storage_keys
from ..errors import Conflict, NotFound
from ..storage import get_storage, work_dir_for
from ..tables import Job, JobEvent, ModelRecord
from .common import is_id, shown_id
from .jobs import get_job
from .models import get_model, model_cache
from .references import active_job_referencing

__all__ = ["delete_job", "delete_model"]

FINISHED = ("succeeded", "failed", "cancelled")


def delete_job(session: Session, tenant: str, job_id: str) -> None:
    """Delete finished job ``job_id``, its events and its work folder; 404 unknown, 409 not finished."""
    if not is_id(job_id):
        raise NotFound(f"no distillation job with id {shown_id(job_id)}", param="job_id")
    job = get_job(session, tenant, job_id)
    if job.status not in FINISHED:
        raise Conflict(f"job {job_id!r} is {job.status}; cancel it and let it finish before deleting it",
                       param="job_id")
    session.execute(update(ModelRecord).where(ModelRecord.job_id == job_id).values(job_id=None))
    session.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
    # Conditional on a finished status, so a check-then-delete race cannot remove a running job's row.
    if session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(FINISHED))).rowcount != 1:
        raise Conflict(f"job {job_id!r} changed state while it was being deleted; try again", param="job_id")
    session.flush()
    shutil.rmtree(work_dir_for(job_id), ignore_errors=True)


def delete_model(session: Session, tenant: str, model_id: str) -> None:
    """Delete model ``model_id`` and its storage folder (a LoRA adapter too: it lives under it);
    404 unknown, 409 while an active job uses it."""
    record = get_model(session, tenant, model_id)
    user = active_job_referencing(session, tenant, "model_id", model_id)
    if user is not None:
        raise Conflict(f"model {model_id!r} is the {user[1]} of {user[0]}, which is still queued or running",
                       param="model_id")
    session.delete(record)
    session.flush()
    get_storage().delete(storage_keys.model_folder(model_id))
    model_cache().discard(model_id)
