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
from pathlib import Path

from app import storage_keys
from app.config import get_settings
from app.db import session_scope
from app.errors import ApiError
from app.services import jobs
from app.services.references import dataset_path, resolve_dataset, resolve_model
from app.storage import get_storage, work_dir_for
from app.tables import FileRecord, ModelRecord, new_id
from distill.archive import make_archive
from distill.device import resolve_device
from distill.errors import DistillError, JobStopped, SpecError
from distill.kinds import get_kind
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
    """The stored API spec with file and model references replaced by local paths. The
    metadata gets how users know the inputs (file id and filename), so the model card and
    the events name them that way, never by a server path."""
    names: dict[str, str] = {}
    with session_scope() as session:
        def model(ref: dict, param: str) -> dict:
            ref = {k: v for k, v in ref.items() if v is not None}
            try:
                path = resolve_model(session, tenant, ref, param).path
            except ApiError as exc:  # deleted or moved since submission
                raise SpecError(exc.detail, param=exc.param) from None
            names[f"{param}_name"] = _reference_name(session, ref)
            return {"path": str(path)}

        def dataset(file_id: str, param: str) -> str:
            try:
                record = resolve_dataset(session, tenant, file_id, param)
            except ApiError as exc:
                raise SpecError(exc.detail, param=exc.param) from None
            names[f"{param.removesuffix('_file')}_name"] = f"{record.id} ({record.filename})"
            return str(dataset_path(record))

        student = {k: v for k, v in spec["student"].items() if v is not None}
        if any(student.get(k) for k in ("file_id", "model_id", "path")):
            student = model(student, "student")
        local = {**spec, "teacher": model(spec["teacher"], "teacher"), "student": student,
                 "training_file": dataset(spec["training_file"], "training_file"),
                 "validation_file": dataset(spec["validation_file"], "validation_file")
                 if spec.get("validation_file") else None,
                 "metadata": {**names, **(spec.get("metadata") or {})}}
    return JobSpec.from_dict(local)


def _reference_name(session, ref: dict) -> str:
    if ref.get("file_id"):
        record = session.get(FileRecord, ref["file_id"])
        return f"{record.id} ({record.filename})"
    return ref.get("model_id") or Path(ref["path"]).name


def register_model(job_id: str, tenant: str, task: str, result: RunResult) -> str:
    """Hand the student (and any generated set) to storage and record it; the job succeeds in the same transaction."""
    storage = get_storage()
    model_id = new_id("model")
    architecture = result.architecture
    kind = get_kind(result.kind)
    if kind.export_format == "hf":
        # The job's final/ folder becomes the model's directory (moved, not copied: models are large);
        # the download is a .tar.gz of it, built once here, next to it in the work folder.
        final = Path(result.model_path)
        architecture = {**kind.inspect(final), "kind": kind.name}
        archive = make_archive(final, final.parent / f"{model_id}.tar.gz")
        key = storage_keys.model_archive(model_id)
        size, sha256 = storage.save_file(key, archive, move=True)
        storage.save_dir(storage_keys.model_dir(model_id), final)
    else:
        key = storage_keys.model_file(model_id)
        size, sha256 = storage.save_file(key, result.model_path)
    result_files = [register_generated(result.generated_path, job_id, tenant)] if result.generated_path else []
    with session_scope() as session:
        session.add(ModelRecord(id=model_id, tenant_id=tenant, job_id=job_id, task=task, kind=kind.name,
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
    size, sha256 = get_storage().save_file(storage_keys.generated_file(file_id), path)
    with session_scope() as session:
        session.add(FileRecord(id=file_id, tenant_id=tenant, filename=f"generated-{job_id}.jsonl",
                               purpose="dataset", bytes=size, sha256=sha256,
                               storage_key=storage_keys.generated_file(file_id),
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
    out_dir = work_dir_for(job_id)
    try:
        result = run_distillation(engine_spec(job.spec, job.tenant_id), out_dir, on_event=reporter.on_event,
                                  should_stop=reporter.should_stop, device=str(device), resume=True,
                                  checkpoint_interval_s=settings.checkpoint_interval_s)
        register_model(job_id, job.tenant_id, job.spec.get("task", "classification"), result)
    except JobStopped as exc:
        if reporter.stop_reason == "time_limit":
            fail(job_id, "time_limit", f"the job ran past the {settings.max_job_seconds}s limit; {exc.message}")
        else:
            with session_scope() as session:
                jobs.finish_job(session, job_id, "cancelled")
    except DistillError as exc:
        fail(job_id, exc.code, exc.message, exc.param)
    except Exception as exc:  # a bug: record it on the job rather than crash-loop the message
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        fail(job_id, "internal_error", f"{type(exc).__name__}: {exc}")
    finally:
        # Finished one way or another (a dead worker never gets here): scratch and checkpoints go.
        shutil.rmtree(out_dir, ignore_errors=True)
