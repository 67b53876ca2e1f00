"""Run one job: claim its row, resolve its files, call the engine, record the outcome.

The engine never sees the database: it gets ``on_event`` and ``should_stop``
callables from :class:`JobReporter`, which writes event rows, heartbeats the job
row (with progress) at most once a second, and reads the cancel flag on the way.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
import traceback

from app.config import get_settings
from app.db import session_scope
from app.services import jobs
from app.storage import get_storage
from app.tables import FileRecord, ModelRecord, new_id
from distill.checkpoint import CHECKPOINTS_DIR
from distill.device import resolve_device
from distill.errors import DistillError, JobStopped, SpecError
from distill.spec import JobSpec
from distill.train import RunResult, run_distillation

log = logging.getLogger(__name__)
HEARTBEAT_EVERY_S = 1.0


class JobReporter:
    def __init__(self, job_id: str, max_seconds: float):
        self.job_id = job_id
        self.deadline = time.monotonic() + max_seconds
        self.progress: dict | None = None
        self.last_poll = 0.0
        self.stop_reason: str | None = None

    def on_event(self, kind: str, data: dict) -> None:
        if kind == "progress":
            self.progress = data
            return
        with session_scope() as session:
            if kind == "epoch":
                message = f"epoch {data['epoch']}: train_loss={data['train_loss']:.4f}"
                jobs.add_event(session, self.job_id, "metrics", message, data)
                jobs.set_metrics(session, self.job_id, data, self.progress)
            else:
                message = f"stage {data['stage']}" if kind == "stage" else kind
                jobs.add_event(session, self.job_id, kind, message, data)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now - self.last_poll < HEARTBEAT_EVERY_S:
            return False
        self.last_poll = now
        with session_scope() as session:
            if jobs.heartbeat(session, self.job_id, self.progress):
                self.stop_reason = "cancelled"
        if now > self.deadline:
            self.stop_reason = "time_limit"
        return self.stop_reason is not None


def engine_spec(spec: dict) -> JobSpec:
    """The stored API spec with file and model ids replaced by local paths."""
    storage = get_storage()
    with session_scope() as session:
        def file_path(file_id: str, param: str) -> str:
            record = session.get(FileRecord, file_id)
            if record is None:
                raise SpecError(f"file {file_id!r} no longer exists", param=param)
            return str(storage.local_path(record.storage_key))

        teacher = spec["teacher"]
        if teacher.get("model_id"):
            model = session.get(ModelRecord, teacher["model_id"])
            if model is None:
                raise SpecError(f"model {teacher['model_id']!r} no longer exists", param="teacher.model_id")
            teacher_path = str(storage.local_path(model.storage_key))
        else:
            teacher_path = file_path(teacher["file_id"], "teacher.file_id")
        local = {**spec, "teacher": {"path": teacher_path},
                 "training_file": file_path(spec["training_file"], "training_file"),
                 "validation_file": file_path(spec["validation_file"], "validation_file")
                 if spec.get("validation_file") else None}
    return JobSpec.from_dict(local)


def register_model(job_id: str, tenant: str, task: str, result: RunResult) -> str:
    storage = get_storage()
    model_id = new_id("model")
    key = f"models/{model_id}/model.safetensors"
    size, sha256 = storage.save_file(key, result.model_path)
    with session_scope() as session:
        session.add(ModelRecord(id=model_id, tenant_id=tenant, job_id=job_id, task=task,
                                architecture=result.architecture.to_dict(),
                                parameters=result.architecture.num_parameters, size_bytes=size, sha256=sha256,
                                storage_key=key, evaluation=result.evaluation))
        session.flush()
        metrics = {**(result.history[-1] if result.history else {}), "evaluation": result.evaluation}
        jobs.finish_job(session, job_id, "succeeded", metrics=metrics, result_model_id=model_id)
    return model_id


def fail(job_id: str, code: str, message: str, param: str | None = None) -> None:
    with session_scope() as session:
        jobs.finish_job(session, job_id, "failed", error={"code": code, "message": message, "param": param})


def execute_job(job_id: str) -> None:
    settings = get_settings()
    try:
        device = resolve_device(settings.device)
    except DistillError as exc:  # a misconfigured worker: fail the job, don't loop on it
        return fail(job_id, exc.code, exc.message, exc.param)
    with session_scope() as session:
        job = jobs.claim_job(session, job_id, worker=socket.gethostname(), device=str(device))
    if job is None:
        log.info("job %s is not runnable (finished, cancelled or unknown); skipping", job_id)
        return
    if job.attempts > settings.max_job_attempts:
        return fail(job_id, "worker_lost", f"the job's worker died {job.attempts - 1} times; giving up")
    log.info("running job %s on %s (attempt %d)", job_id, device, job.attempts)
    reporter = JobReporter(job_id, settings.max_job_seconds)
    out_dir = get_storage().local_path(f"jobs/{job_id}")
    try:
        result = run_distillation(engine_spec(job.spec), out_dir, on_event=reporter.on_event,
                                  should_stop=reporter.should_stop, device=str(device), resume=True,
                                  checkpoint_interval_s=settings.checkpoint_interval_s)
        register_model(job_id, job.tenant_id, job.spec.get("task", "classification"), result)
        shutil.rmtree(out_dir / CHECKPOINTS_DIR, ignore_errors=True)
    except JobStopped as exc:
        if reporter.stop_reason == "time_limit":
            return fail(job_id, "time_limit", f"the job ran past the {settings.max_job_seconds}s limit; {exc.message}")
        with session_scope() as session:
            jobs.finish_job(session, job_id, "cancelled")
    except DistillError as exc:
        fail(job_id, exc.code, exc.message, exc.param)
    except Exception as exc:  # a bug: record it on the job rather than crash-loop the message
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        fail(job_id, "internal_error", f"{type(exc).__name__}: {exc}")
