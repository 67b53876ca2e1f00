"""Distillation jobs: submission (checked against the referenced files), cancellation,
events, and the state transitions a worker makes. Every transition that can race
(cancel vs. claim) is a conditional UPDATE, so the database stays the one truth."""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from distill.errors import DistillError
from distill.hf import CONTEXT_FIELDS, load_tokenizer, shared_vocab_size, student_parameters_from_config
from distill.models import MLPArchitecture
from distill.text_data import DEFAULT_MAX_LENGTH

from ..config import get_settings
from ..errors import Conflict, NotFound, Unavailable, Unprocessable
from ..queue import enqueue_job
from ..schemas import JobCreate
from ..tables import Job, JobEvent, new_id, utcnow
from .common import paginate
from .references import ModelRef, resolve_dataset, resolve_model

log = logging.getLogger(__name__)
FINISHED = ("succeeded", "failed", "cancelled")


TEXT_KINDS = {"causal_lm": ("text", "prompt_completion"), "text_classification": ("text_label",)}


def _check_teacher_task(body: JobCreate, teacher: ModelRef) -> None:
    if teacher.task != body.task:
        found = f"a {teacher.task} model" if teacher.task else "a model with no task this service runs"
        raise Unprocessable(f"task {body.task!r} needs a {body.task} teacher; this teacher is {found} "
                            f"(kind {teacher.kind!r})", param="teacher")


def _check_labels(param: str, details: dict, num_classes: int | None) -> None:
    """Labels in a dataset must be classes the teacher has (0..num_classes-1)."""
    biggest = details["max_label"] if "max_label" in details else \
        details["num_labels"] - 1 if details.get("num_labels") else None
    if biggest is not None and num_classes is not None and biggest >= num_classes:
        raise Unprocessable(f"{param} has label {biggest} but the teacher has {num_classes} classes "
                            f"(labels 0..{num_classes - 1})", param=param, code="mismatch")


def _check_tabular(session: Session, tenant: str, body: JobCreate, teacher: ModelRef) -> None:
    architecture = MLPArchitecture.from_dict(teacher.details["architecture"])
    for param, file_id in _dataset_refs(body):
        details = resolve_dataset(session, tenant, file_id, param).details
        if "num_features" not in details:
            raise Unprocessable(f"{param} is a text dataset; task 'classification' needs numeric features",
                                param=param, code="mismatch")
        if details["num_features"] != architecture.input_dim:
            raise Unprocessable(f"{param} has {details['num_features']} features per row but the teacher takes "
                                f"{architecture.input_dim}", param=param, code="mismatch")
        _check_labels(param, details, architecture.num_classes)
    student = MLPArchitecture(input_dim=architecture.input_dim, num_classes=architecture.num_classes,
                              hidden_dims=body.student.architecture.hidden_dims)
    _check_size(student.num_parameters, "student.architecture.hidden_dims")


def _check_size(parameters: int, param: str) -> None:
    limit = get_settings().max_student_parameters
    if parameters > limit:
        raise Unprocessable(f"the student would have {parameters} parameters; the limit is {limit} "
                            "(DISTILL_MAX_STUDENT_PARAMETERS)", param=param)


def _check_text(session: Session, tenant: str, body: JobCreate, teacher: ModelRef) -> None:
    task = body.task
    for param, file_id in _dataset_refs(body):
        details = resolve_dataset(session, tenant, file_id, param).details
        kind = details.get("kind")
        if kind not in TEXT_KINDS[task]:
            raise Unprocessable(f"task {task!r} needs {' or '.join(TEXT_KINDS[task])} records; {param} holds "
                                f"{kind or 'numeric features'}", param=param, code="mismatch")
        if task == "text_classification":
            _check_labels(param, details, teacher.details.get("num_labels"))
    contexts = [("teacher", teacher.model_kind.context_length(teacher.details))]
    reference = body.student.reference()
    if reference is not None:
        pretrained = resolve_model(session, tenant, reference, "student")
        if pretrained.task != task:
            raise Unprocessable(f"the student must be a transformers {task} model", param="student")
        _check_size(pretrained.details.get("parameters") or 0, "student")
        if task == "causal_lm" and body.method == "token":
            _check_vocabulary(teacher, pretrained)
        contexts.append(("student", pretrained.model_kind.context_length(pretrained.details)))
    elif body.student.derive is not None:
        _check_derive(body, teacher)
    else:
        overrides = body.student.architecture.config
        contexts.append(("student", _config_context(overrides)))
        _check_size(_config_parameters(teacher, overrides, task), "student.architecture.config")
    _check_lengths(body, teacher, contexts)


def _check_derive(body: JobCreate, teacher: ModelRef) -> None:
    depth = teacher.details.get("num_layers")
    derive = body.student.derive
    if depth is None:
        return
    if derive.num_layers is not None and derive.num_layers > depth:
        raise Unprocessable(f"student.derive.num_layers is {derive.num_layers} but the teacher has {depth} layers",
                            param="student.derive.num_layers")
    if derive.layers is not None:
        for i, layer in enumerate(derive.layers):
            if layer >= depth:
                raise Unprocessable(f"student.derive.layers[{i}] is {layer} but the teacher has {depth} layers "
                                    f"(0..{depth - 1})", param=f"student.derive.layers[{i}]")
    kept = derive.num_layers or len(derive.layers)
    _check_size(_config_parameters(teacher, {"num_hidden_layers": kept}, body.task), "student.derive")


def _config_parameters(teacher: ModelRef, overrides: dict, task: str) -> int:
    try:
        return student_parameters_from_config(teacher.path, overrides, task)
    except DistillError as exc:
        raise Unprocessable(exc.message, param=exc.param or "student.architecture.config", code=exc.code) from None


def _config_context(overrides: dict) -> int | None:
    values = [v for k, v in overrides.items() if k in CONTEXT_FIELDS and isinstance(v, int)]
    return min(values) if values else None


def _check_lengths(body: JobCreate, teacher: ModelRef, contexts: list[tuple[str, int | None]]) -> None:
    """data.max_length within every model's context; a missing one becomes min(256, context)."""
    known = [(who, c) for who, c in contexts if c is not None]
    context = min((c for _, c in known), default=None)
    if body.data.max_length is None:
        body.data.max_length = min(DEFAULT_MAX_LENGTH, context) if context else DEFAULT_MAX_LENGTH
    elif context is not None and body.data.max_length > context:
        who = next(w for w, c in known if c == context)
        raise Unprocessable(f"data.max_length is {body.data.max_length} but the {who}'s context is {context} tokens; "
                            f"use at most {context}", param="data.max_length")
    teacher_context = teacher.model_kind.context_length(teacher.details)
    if body.method == "sequence" and teacher_context is not None \
            and body.generation.max_new_tokens >= teacher_context:
        raise Unprocessable(f"generation.max_new_tokens is {body.generation.max_new_tokens} but the teacher's "
                            f"context is {teacher_context} tokens", param="generation.max_new_tokens")


def _check_vocabulary(teacher: ModelRef, student: ModelRef) -> None:
    """Token-level KD compares distributions over one vocabulary; different tokenizers can't."""
    try:
        shared_vocab_size(load_tokenizer(teacher.path), load_tokenizer(student.path),
                          teacher.details["vocab_size"], student.details["vocab_size"])
    except DistillError as exc:
        raise Unprocessable(exc.message, param=exc.param or "student", code=exc.code) from None


def _dataset_refs(body: JobCreate) -> list[tuple[str, str]]:
    refs = [("training_file", body.training_file)]
    if body.validation_file is not None:
        refs.append(("validation_file", body.validation_file))
    return refs


def check_submission(session: Session, tenant: str, body: JobCreate) -> None:
    """The checks the files' metadata allows at submit time; the worker checks the data itself."""
    teacher = resolve_model(session, tenant, body.teacher.model_dump(exclude_none=True), "teacher")
    _check_teacher_task(body, teacher)
    if body.task == "classification":
        _check_tabular(session, tenant, body, teacher)
    else:
        _check_text(session, tenant, body, teacher)


def add_event(session: Session, job_id: str, type: str, message: str = "", data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, type=type, message=message, data=data or {}))


def create_job(session: Session, tenant: str, body: JobCreate) -> Job:
    check_submission(session, tenant, body)
    job = Job(id=new_id("job"), tenant_id=tenant, status="queued", spec=body.model_dump(mode="json"),
              progress={"epoch": 0, "step": 0, "total_steps": 0}, metrics={})
    session.add(job)
    add_event(session, job.id, "stage", "job queued", {"stage": "queued"})
    session.commit()  # the worker must see the row before it sees the message
    try:
        enqueue_job(job.id)
    except Exception as exc:  # broker down: say so now rather than leave a job nobody will run
        log.exception("could not enqueue %s", job.id)
        finish_job(session, job.id, "failed", error={"code": "queue_unavailable", "message": str(exc), "param": None})
        session.commit()
        raise Unavailable(f"the job queue is unavailable ({exc}); job {job.id} was marked failed") from None
    return job


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant:
        raise NotFound(f"no distillation job with id {job_id!r}", param="job_id")
    return job


def list_jobs(session: Session, tenant: str, status: str | None, after: str | None, limit: int):
    query = select(Job).where(Job.tenant_id == tenant)
    if status is not None:
        query = query.where(Job.status == status)
    return paginate(session, Job, query, after, limit)


def cancel_job(session: Session, tenant: str, job_id: str) -> Job:
    job = get_job(session, tenant, job_id)
    if job.status in FINISHED:
        raise Conflict(f"job {job_id!r} has already finished ({job.status})", param="job_id")
    # A queued job is cancelled outright; a running one is asked to stop and its worker confirms.
    if _transition(session, job_id, "queued", "cancelled", finished_at=utcnow()):
        add_event(session, job_id, "stage", "job cancelled before it started", {"stage": "cancelled"})
    else:
        session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
        add_event(session, job_id, "stage", "cancellation requested", {"stage": "cancel_requested"})
    session.commit()
    session.refresh(job)
    return job


def list_events(session: Session, tenant: str, job_id: str, after: int | None, limit: int):
    get_job(session, tenant, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = session.scalars(query.order_by(JobEvent.id).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit


# ---- transitions made by the worker -----------------------------------------------------------------------

def _transition(session: Session, job_id: str, from_status: str, to_status: str, **values) -> bool:
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == from_status)
                             .values(status=to_status, **values))
    return result.rowcount == 1


def claim_job(session: Session, job_id: str, worker: str, device: str) -> Job | None:
    """queued → running (or a redelivered running job whose worker died); None if there is nothing to run."""
    job = session.get(Job, job_id)
    if job is None or job.status in FINISHED:
        return None
    now = utcnow()
    values = dict(worker=worker, device=device, heartbeat_at=now, attempts=job.attempts + 1)
    if job.status == "queued":
        claimed = _transition(session, job_id, "queued", "running", started_at=now, **values)
    else:  # running: the message came back because the worker holding it was lost
        claimed = _transition(session, job_id, "running", "running", **values)
    session.commit()
    if not claimed:
        return None
    session.refresh(job)
    return job


def heartbeat(session: Session, job_id: str, progress: dict | None) -> bool:
    """Record liveness (and progress); returns whether the job was asked to stop."""
    values: dict = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish_job(session: Session, job_id: str, status: str, error: dict | None = None, metrics: dict | None = None,
               result_model_id: str | None = None, result_files: list[str] | None = None) -> None:
    values: dict = {"status": status, "finished_at": utcnow(), "error": error}
    if result_files:
        values["result_files"] = result_files
    if metrics is not None:
        values["metrics"] = metrics
    if result_model_id is not None:
        values["result_model_id"] = result_model_id
    session.execute(update(Job).where(Job.id == job_id, Job.status.in_(("queued", "running"))).values(**values))
    message = f"job {status}" + (f": {error['message']}" if error else "")
    add_event(session, job_id, "stage", message, {"stage": status, **({"error": error} if error else {})})


def set_metrics(session: Session, job_id: str, metrics: dict, progress: dict | None) -> None:
    values = {"metrics": metrics, **({"progress": progress} if progress is not None else {})}
    session.execute(update(Job).where(Job.id == job_id).values(**values))
