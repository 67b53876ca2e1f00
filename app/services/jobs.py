"""Distillation jobs: submission (checked against the referenced files), cancellation,
events, and the state transitions a worker makes. Every transition that can race
(cancel vs. claim) is a conditional UPDATE, so the database stays the one truth."""

from __future__ import annotations

import logging

from datetime import timedelta

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
    # heartbeat_at of a queued job = when it was published; the reconciler re-sends a lost message.
    job = Job(id=new_id("job"), tenant_id=tenant, status="queued", spec=body.model_dump(mode="json"),
              progress={"epoch": 0, "step": 0, "total_steps": 0}, metrics={}, heartbeat_at=utcnow())
    session.add(job)
    add_event(session, job.id, "stage", "job queued", {"stage": "queued"})
    session.commit()  # the worker must see the row before it sees the message
    try:
        enqueue_job(job.id)
    except Exception as exc:  # broker down: say so now rather than leave a job nobody will run
        log.exception("could not enqueue %s", job.id)
        error = {"code": "queue_unavailable", "message": str(exc), "param": None}
        session.execute(update(Job).where(Job.id == job.id, Job.status == "queued").values(
            status="failed", finished_at=utcnow(), error=error))
        add_event(session, job.id, "stage", f"job failed: {exc}", {"stage": "failed", "error": error})
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
    return paginate(session, Job, query, after, limit, tenant=tenant)


def cancel_job(session: Session, tenant: str, job_id: str) -> Job:
    """Cancel for good: a 200 means the job ends ``cancelled``, never ``succeeded``.

    Queued → cancelled at once. Running → ``cancel_requested`` in a conditional update; the
    worker stops at its next check, and its success update loses against the flag. A running
    job whose worker has stopped heartbeating is cancelled at once (nobody will confirm).
    A job that finished in the meantime is a 409, never a 200 with a finished job."""
    get_job(session, tenant, job_id)
    now = utcnow()
    if session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
            status="cancelled", finished_at=now)).rowcount == 1:
        add_event(session, job_id, "stage", "job cancelled before it started", {"stage": "cancelled"})
    else:
        dead_before = now - timedelta(seconds=get_settings().heartbeat_timeout_s)
        if session.execute(update(Job).where(Job.id == job_id, Job.status == "running",
                                             Job.heartbeat_at < dead_before).values(
                status="cancelled", finished_at=now, cancel_requested=True)).rowcount == 1:
            add_event(session, job_id, "stage", "job cancelled (its worker was lost)", {"stage": "cancelled"})
        elif session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(
                cancel_requested=True)).rowcount == 1:
            add_event(session, job_id, "stage", "cancellation requested", {"stage": "cancel_requested"})
        else:
            session.rollback()
            job = get_job(session, tenant, job_id)
            raise Conflict(f"job {job_id!r} has already finished ({job.status})", param="job_id")
    session.commit()
    job = get_job(session, tenant, job_id)
    session.refresh(job)
    return job


def list_events(session: Session, tenant: str, job_id: str, after: int | None, limit: int):
    get_job(session, tenant, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = session.scalars(query.order_by(JobEvent.id).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit
