"""Run one job: claim its row (a lease), resolve its files, call the engine, record the outcome.

The engine never sees the database: it gets ``on_event`` and ``should_stop`` callables
from :class:`JobLease`. A heartbeat thread renews the lease (with progress) every
``HEARTBEAT_EVERY_S`` and reads the cancel flag; ``should_stop`` only reads flags, so
the engine's checks cost nothing. Liveness is the process's, not the loop's: a long
teacher pass or model load still heartbeats. Every write is fenced on the lease
(:mod:`app.services.leases`): a worker whose job was handed on writes nothing more.

Stops: a requested cancel, the job's time limit, a lost lease, and a worker shutdown
(SIGTERM: :func:`request_shutdown`), after which the job is checkpointed by the engine
and handed back to the queue for the next worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import traceback
from pathlib import Path

from app import storage_keys
from app.config import get_settings
from app.db import session_scope
from app.errors import ApiError
from app.queue import enqueue_job
from app.services import leases
from app.services.leases import LeaseLost
from app.services.references import dataset_path, resolve_dataset, resolve_model
from app.services.report import append_to_card
from app.storage import get_storage, work_dir_for, work_root
from app.tables import FileRecord, ModelRecord, new_id
from distill.archive import make_archive
from distill.device import resolve_device
from distill.errors import DistillError, JobStopped, SpecError
from distill.kinds import get_kind
from distill.spec import JobSpec
from distill.text_data import inspect_text_dataset
from distill.teacher_cache import TeacherCache
from distill.train import RunResult, run_distillation

log = logging.getLogger(__name__)
HEARTBEAT_EVERY_S = 1.0
_shutdown = threading.Event()  # set on SIGTERM (worker_shutting_down): hand the running job back


def request_shutdown() -> None:
    _shutdown.set()


class JobLease:
    """The worker's hold on one job: heartbeats, fenced event writes and the stop flags."""

    def __init__(self, job_id: str, attempt: int, max_seconds: float):
        self.job_id, self.attempt = job_id, attempt
        self.deadline = time.monotonic() + max_seconds
        self.progress: dict | None = None
        self.stop_reason: str | None = None
        self.ended = False  # this worker wrote the job's final state (only then is its scratch ours to remove)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "JobLease":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_EVERY_S):
            try:
                with session_scope() as session:
                    if leases.renew(session, self.job_id, self.attempt, self.progress):
                        self._stop("cancelled")
            except LeaseLost:
                self._stop("lease_lost")
            except Exception:  # a database hiccup: try again next beat; the reaper's timeout is generous
                log.warning("heartbeat of %s failed", self.job_id, exc_info=True)
            if time.monotonic() > self.deadline:
                self._stop("time_limit")

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def should_stop(self) -> bool:
        if _shutdown.is_set():
            self._stop("shutdown")
        if self.stop_reason == "lease_lost":
            # Not a stop the engine should checkpoint: the job is another worker's now, and this
            # one must not write into its folder. Unwind at once.
            raise LeaseLost(self.job_id)
        return self.stop_reason is not None

    def on_event(self, kind: str, data: dict) -> None:
        if kind == "progress":
            self.progress = data
            return
        try:
            with session_scope() as session:
                if kind == "epoch":
                    loss = data.get("train_loss")
                    message = f"epoch {data['epoch']}: train_loss=" + (f"{loss:.4f}" if loss is not None else "n/a")
                    leases.record_event(session, self.job_id, self.attempt, "metrics", message, data)
                    leases.set_metrics(session, self.job_id, self.attempt, data, self.progress)
                else:
                    message = f"stage {data['stage']}" if kind == "stage" else kind
                    leases.record_event(session, self.job_id, self.attempt, kind, message, data)
        except LeaseLost:
            self._stop("lease_lost")


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

        refs = ("file_id", "model_id", "path")
        student = {k: v for k, v in spec["student"].items() if v is not None}
        if any(student.get(k) for k in refs):  # keep the other fields (lora)
            student = {**{k: v for k, v in student.items() if k not in refs}, **model(student, "student")}
        teachers = {"teacher": model(spec["teacher"], "teacher")} if spec.get("teacher") else {
            "teachers": [{"weight": t.get("weight", 1.0), **model({k: t.get(k) for k in refs}, f"teachers[{i}]")}
                         for i, t in enumerate(spec["teachers"])]}
        local = {**{k: v for k, v in spec.items() if k not in ("teacher", "teachers")}, **teachers, "student": student,
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


def register_model(lease: JobLease, tenant: str, task: str, result: RunResult) -> str | None:
    """Hand the student (and any generated set) to storage, record it and succeed the job in
    one transaction. None (and nothing kept) when a cancel won or the lease was lost."""
    job_id = lease.job_id
    storage = get_storage()
    model_id = new_id("model")
    architecture = result.architecture
    kind = get_kind(result.kind)
    if kind.export_format == "hf":
        # The job's final/ folder becomes the model's directory (moved, not copied: models are large);
        # the download is a .tar.gz of it, built once here, next to it in the work folder.
        final = Path(result.model_path)
        architecture = {**kind.inspect(final), "kind": kind.name}
        with session_scope() as session:  # lineage (uploads' sha256), run and spec: what the engine can't know
            append_to_card(session, final / "README.md", tenant, job_id)
        archive = make_archive(final, final.parent / f"{model_id}.tar.gz")
        key = storage_keys.model_archive(model_id)
        size, sha256 = storage.save_file(key, archive, move=True)
        storage.save_dir(storage_keys.model_dir(model_id), final)
        if result.adapter_path is not None:  # a LoRA student: its adapter folder too (download ?format=adapter)
            from app.services.models import store_adapter

            architecture["lora"] = {**result.architecture.get("lora", {}),
                                    **store_adapter(model_id, Path(result.adapter_path))}
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
        if leases.succeed(session, job_id, lease.attempt, metrics, model_id, result_files):
            lease.ended = True
            return model_id
        session.rollback()  # a cancel won, or the job is no longer ours: keep nothing
    storage.delete(storage_keys.model_folder(model_id))
    for file_id in result_files:
        _drop_file(file_id)
    with session_scope() as session:
        lease.ended = leases.finish(session, job_id, lease.attempt, "cancelled")  # False when the lease is gone
    return None


def _drop_file(file_id: str) -> None:
    with session_scope() as session:
        record = session.get(FileRecord, file_id)
        if record is not None:
            session.delete(record)
    get_storage().delete(storage_keys.file_folder(file_id))


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


def _finish(lease: JobLease, status: str, code: str | None = None, message: str = "",
            param: str | None = None) -> None:
    error = {"code": code, "message": message, "param": param} if code else None
    with session_scope() as session:
        lease.ended = leases.finish(session, lease.job_id, lease.attempt, status, error)


def _hand_back(lease: JobLease, reason: str) -> None:
    """The worker is shutting down: the job goes back to the queue (its checkpoint stays)."""
    with session_scope() as session:
        released = leases.release(session, lease.job_id, lease.attempt, reason)
    if released:
        enqueue_job(lease.job_id)


def execute_job(job_id: str) -> None:
    settings = get_settings()
    if _shutdown.is_set():  # a message taken during shutdown: leave it to the next worker
        enqueue_job(job_id)
        return
    try:
        device = str(resolve_device(settings.device))
    except DistillError as exc:
        device, device_error = settings.device, exc
    else:
        device_error = None
    with session_scope() as session:
        job = leases.claim(session, job_id, worker=f"{socket.gethostname()}:{os.getpid()}", device=device)
    if job is None:
        log.info("job %s is not queued (running elsewhere, finished or unknown); skipping", job_id)
        return
    log.info("running job %s on %s (lease %d)", job_id, device, job.attempts)
    out_dir = work_dir_for(job_id)
    with JobLease(job_id, job.attempts, settings.max_job_seconds) as lease:
        if device_error is not None:  # a misconfigured worker: fail the job with why, don't loop on it
            return _finish(lease, "failed", device_error.code, device_error.message, device_error.param)
        _run(lease, job, out_dir, device, settings)


def _run(lease: JobLease, job, out_dir: Path, device, settings) -> None:
    try:
        result = run_distillation(engine_spec(job.spec, job.tenant_id), out_dir, on_event=lease.on_event,
                                  should_stop=lease.should_stop, device=device, resume=True,
                                  checkpoint_interval_s=settings.checkpoint_interval_s,
                                  teacher_cache=TeacherCache(work_root(settings), settings.teacher_cache_bytes))
        register_model(lease, job.tenant_id, job.spec.get("task", "classification"), result)
    except JobStopped as exc:
        reason = lease.stop_reason or "cancelled"
        if reason == "shutdown":
            _hand_back(lease, "worker shutting down")  # the checkpoint stays: the next worker resumes from it
        elif reason == "time_limit":
            _finish(lease, "failed", "time_limit", f"the job ran past the {settings.max_job_seconds}s limit; "
                                                   f"{exc.message}")
        else:
            _finish(lease, "cancelled")
    except LeaseLost:
        log.warning("job %s: lease lost (the job was handed on); stopped without writing", lease.job_id)
    except DistillError as exc:
        _finish(lease, "failed", exc.code, exc.message, exc.param)
    except Exception as exc:  # a bug: record it on the job rather than crash-loop the message
        log.error("job %s crashed:\n%s", lease.job_id, traceback.format_exc())
        _finish(lease, "failed", "internal_error", f"{type(exc).__name__}: {exc}")
    finally:
        # Only a job this worker ended loses its scratch: a job handed back or handed on (lease
        # lost) lives on with the next worker, which resumes from these checkpoints.
        if lease.ended:
            shutil.rmtree(out_dir, ignore_errors=True)
