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
from app.errors import ApiError
from app.services import jobs
from app.services.references import dataset_path, model_dir_key, resolve_dataset, resolve_model
from app.storage import file_sha256, get_storage
from app.tables import FileRecord, ModelRecord, new_id
from distill.archive import make_archive
from distill.checkpoint import CHECKPOINTS_DIR
from distill.device import resolve_device
from distill.errors import DistillError, JobStopped, SpecError
from distill.hf import inspect_model_dir
from distill.spec import JobSpec
from distill.text_data import inspect_text_dataset
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


def engine_spec(spec: dict, tenant: str) -> JobSpec:
    """The stored API spec with file and model references replaced by local paths."""
    with session_scope() as session:
        def model(ref: dict, param: str) -> dict:
            try:
                return {"path": str(resolve_model(session, tenant, ref, param).path)}
            except ApiError as exc:  # deleted or moved since submission
                raise SpecError(exc.detail, param=exc.param) from None

        def dataset(file_id: str, param: str) -> str:
            try:
                return str(dataset_path(resolve_dataset(session, tenant, file_id, param)))
            except ApiError as exc:
                raise SpecError(exc.detail, param=exc.param) from None

        student = spec["student"]
        if any(student.get(k) for k in ("file_id", "model_id", "path")):
            student = model({k: v for k, v in student.items() if v is not None}, "student")
        else:
            student = {k: v for k, v in student.items() if v is not None}
        local = {**spec, "teacher": model({k: v for k, v in spec["teacher"].items() if v is not None}, "teacher"),
                 "student": student,
                 "training_file": dataset(spec["training_file"], "training_file"),
                 "validation_file": dataset(spec["validation_file"], "validation_file")
                 if spec.get("validation_file") else None}
    return JobSpec.from_dict(local)


def register_model(job_id: str, tenant: str, task: str, result: RunResult) -> str:
    """Keep the student (and any generated set) in storage and record it; the job succeeds in the same transaction."""
    storage = get_storage()
    model_id = new_id("model")
    architecture = result.architecture
    if result.format == "hf":
        # The job's final/ folder becomes the model's directory (a move, not a copy: models are large);
        # the download is a .tar.gz of it, built once here.
        model_dir = storage.local_path(model_dir_key(model_id))
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(result.model_path, model_dir)
        key = f"models/{model_id}/{model_id}.tar.gz"
        archive = make_archive(model_dir, storage.local_path(key))
        size, sha256 = archive.stat().st_size, file_sha256(archive)
        architecture = {**inspect_model_dir(model_dir), "kind": "hf"}
    else:
        key = f"models/{model_id}/model.safetensors"
        size, sha256 = storage.save_file(key, result.model_path)
    result_files = [register_generated(result.generated_path, job_id, tenant)] if result.generated_path else []
    with session_scope() as session:
        session.add(ModelRecord(id=model_id, tenant_id=tenant, job_id=job_id, task=task,
                                architecture=architecture, parameters=result.parameters, size_bytes=size,
                                sha256=sha256, storage_key=key, evaluation=result.evaluation))
        session.flush()
        metrics = {**(result.history[-1] if result.history else {}), "evaluation": result.evaluation}
        jobs.finish_job(session, job_id, "succeeded", metrics=metrics, result_model_id=model_id,
                        result_files=result_files)
    return model_id


def register_generated(path, job_id: str, tenant: str) -> str:
    """The teacher-generated training set of sequence-level KD, as a downloadable dataset file."""
    file_id = new_id("file")
    key = f"files/{file_id}/content.jsonl"
    size, sha256 = get_storage().save_file(key, path)
    with session_scope() as session:
        session.add(FileRecord(id=file_id, tenant_id=tenant, filename=f"generated-{job_id}.jsonl",
                               purpose="dataset", bytes=size, sha256=sha256, storage_key=key,
                               details={**inspect_text_dataset(path), "generated_by": job_id}))
    return file_id


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
        result = run_distillation(engine_spec(job.spec, job.tenant_id), out_dir, on_event=reporter.on_event,
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
