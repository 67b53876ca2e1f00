"""Distillation jobs: submission (checked against the referenced files), cancellation,
events, and the state transitions a worker makes. Every transition that can race
(cancel vs. claim) is a conditional UPDATE, so the database stays the one truth.

A submit is one transaction and one broker publish (issue 9: the create path at 64 clients).
A tenant's submits must be counted one after another against its job quota (under a lock held
until the commit), and a commit waits for the disk: one commit per submit would cap a tenant at a
few hundred submits a second on a good disk and far fewer on a busy machine, and have every
request wait in line. So a submit is checked in the request (:func:`prepare_job`: the files it
names from the process's cache, else read in one query) and then joins its tenant's next batch
(:func:`submit_job`, the micro-batcher of ``services.batching``, per process, no added wait): one
transaction inserts the batch's jobs and first events under the quota lock, reads their queue
positions, records their idempotent responses and commits once; then one thread publishes the
batch (each job once, on one pooled producer) while the next batch's transaction runs. A job's
place in the queue is a count over the index on (status, created_at, id) (migration 0006), read
with the job itself in one query (one round trip) on a GET."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from types import SimpleNamespace

from sqlalchemy import ScalarSelect, bindparam, case, delete, func, insert, select, tuple_, update
from sqlalchemy.orm import Session, aliased

from distill.errors import DistillError, SpecError
from distill.hf import (CONTEXT_FIELDS, LAYER_COUNT_FIELDS, load_tokenizer, shared_vocab_size,
                        student_parameters_from_config)
from distill.spec import CROSS_TOKENIZER_LOSSES, check_combinations
from distill.models import MLPArchitecture
from distill.text_data import DEFAULT_MAX_LENGTH

from ..config import get_settings
from ..errors import Conflict, NotFound, Unavailable, Unprocessable
from ..db import new_session, read_row, session_scope
from ..queue import enqueue_jobs
from ..schemas import JobCreate, JobPublic
from ..tables import Job, JobEvent, new_id, utcnow
from . import idempotency, quotas, webhooks
from .batching import MicroBatcher
from .common import is_id, job_public, paginate
from .references import ModelRef, cached_files, prefetch_files, resolve_dataset, resolve_model

log = logging.getLogger(__name__)
FINISHED = ("succeeded", "failed", "cancelled")


TEXT_KINDS = {"causal_lm": ("text", "prompt_completion"), "text_classification": ("text_label",)}
ON_POLICY_KINDS = ("prompt_completion", "prompt")


def _allowed_kinds(body: JobCreate) -> tuple[str, ...]:
    if body.method == "on_policy":
        # prompts alone: every batch must be on-policy (the student writes all completions)
        return ON_POLICY_KINDS if body.on_policy.lambda_ == 1 else ("prompt_completion",)
    return TEXT_KINDS[body.task]


def _check_teacher_task(body: JobCreate, teacher: ModelRef, param: str = "teacher") -> None:
    if teacher.task != body.task:
        found = f"a {teacher.task} model" if teacher.task else "a model with no task this service runs"
        raise Unprocessable(f"task {body.task!r} needs a {body.task} teacher; {param} is {found} "
                            f"(kind {teacher.kind!r})", param=param)


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
    allowed = _allowed_kinds(body)
    for param, file_id in _dataset_refs(body):
        details = resolve_dataset(session, tenant, file_id, param).details
        kind = details.get("kind")
        if kind not in allowed:
            needs = f"method {body.method!r}" + (f" with on_policy.lambda {body.on_policy.lambda_}"
                                                  if body.method == "on_policy" else "")
            hint = "; prompt-only data needs on_policy.lambda 1" if kind == "prompt" and body.method == "on_policy" \
                else ""
            raise Unprocessable(f"task {task!r} with {needs} needs {' or '.join(allowed)} records; {param} holds "
                                f"{kind or 'numeric features'}{hint}", param=param, code="mismatch")
        if task == "text_classification":
            _check_labels(param, details, teacher.details.get("num_labels"))
    contexts = [("teacher", teacher.model_kind.context_length(teacher.details))]
    reference = body.student.reference()
    if reference is not None:
        pretrained = resolve_model(session, tenant, reference, "student")
        if pretrained.task != task:
            raise Unprocessable(f"the student must be a transformers {task} model", param="student")
        _check_size(pretrained.details.get("parameters") or 0, "student")
        if body.loss.type in CROSS_TOKENIZER_LOSSES:
            _check_tokenizers_differ(body, teacher, pretrained)
        elif task == "causal_lm" and body.method in ("token", "on_policy"):
            _check_vocabulary(teacher, pretrained)
        student_layers = pretrained.details.get("num_layers")
        contexts.append(("student", pretrained.model_kind.context_length(pretrained.details)))
    else:
        if body.loss.type in CROSS_TOKENIZER_LOSSES:
            raise Unprocessable(f"loss.type {body.loss.type!r} is for a student with a tokenizer of its own; a derived "
                                "or architecture student shares the teacher's, where forward_kl is exact",
                                param="loss.type")
        if body.student.derive is not None:
            _check_derive(body, teacher)
            derive = body.student.derive
            student_layers = derive.num_layers or len(derive.layers)
        else:
            overrides = body.student.architecture.config
            contexts.append(("student", _config_context(overrides)))
            _check_size(_config_parameters(teacher, overrides, task), "student.architecture.config")
            given = [v for k, v in overrides.items() if k in LAYER_COUNT_FIELDS and isinstance(v, int)]
            student_layers = given[0] if given else teacher.details.get("num_layers")
    if body.intermediate is not None:
        _check_intermediate_layers(body, teacher, student_layers, pretrained if reference is not None else None)
    _check_lengths(body, teacher, contexts)


def _check_tokenizers_differ(body: JobCreate, teacher: ModelRef, student: ModelRef) -> None:
    """ULD is for different tokenizers; with one tokenizer the plain divergence is exact."""
    try:
        shared_vocab_size(load_tokenizer(teacher.path), load_tokenizer(student.path),
                          teacher.details["vocab_size"], student.details["vocab_size"])
    except DistillError:
        return
    raise Unprocessable(f"loss.type {body.loss.type!r} is for a student whose tokenizer differs from the teacher's; "
                        "these two share one tokenizer, where forward_kl (or another divergence) is exact",
                        param="loss.type")


def _check_intermediate_layers(body: JobCreate, teacher: ModelRef, student_layers: int | None,
                               pretrained: ModelRef | None) -> None:
    """intermediate: layer pairs within both depths; attention needs equal head counts (a derived
    student has the teacher's, an architecture student the teacher's unless its config overrides
    them); a pretrained text-classification student must share the teacher's tokenizer (the
    teacher runs on the student's tokens). Counts a model's details lack are left to the engine."""
    layers, teacher_layers = body.intermediate.layers, teacher.details.get("num_layers")
    for i, (student_layer, teacher_layer) in enumerate(layers if isinstance(layers, list) else ()):
        for position, which, layer, depth in ((0, "student", student_layer, student_layers),
                                              (1, "teacher", teacher_layer, teacher_layers)):
            if depth is not None and layer >= depth:
                raise Unprocessable(f"intermediate.layers[{i}] pairs {which} layer {layer} but the {which} has "
                                    f"{depth} layers (0..{depth - 1})",
                                    param=f"intermediate.layers[{i}][{position}]")
    teacher_heads = teacher.details.get("num_attention_heads")
    if pretrained is not None:
        student_heads = pretrained.details.get("num_attention_heads")
    else:
        overrides = body.student.architecture.config if body.student.architecture is not None else {}
        given = [v for k, v in overrides.items()
                 if k in ("num_attention_heads", "n_head", "n_heads", "num_heads") and isinstance(v, int)]
        student_heads = given[0] if given else teacher_heads
    if body.intermediate.attention and None not in (student_heads, teacher_heads) and student_heads != teacher_heads:
        raise Unprocessable(f"intermediate.attention compares the last layers' attention head by head, but the student "
                            f"has {student_heads} heads and the teacher {teacher_heads}; give the student "
                            f"{teacher_heads} heads or leave attention off", param="intermediate.attention",
                            code="mismatch")
    if pretrained is not None and body.task == "text_classification" and pretrained.details.get("has_tokenizer"):
        try:
            shared_vocab_size(load_tokenizer(teacher.path), load_tokenizer(pretrained.path),
                              teacher.details["vocab_size"], pretrained.details["vocab_size"])
        except DistillError:
            raise Unprocessable("intermediate runs the teacher on the student's tokens, but the student's tokenizer "
                                "differs from the teacher's; give the student the teacher's tokenizer or leave "
                                "intermediate out", param="intermediate", code="mismatch") from None


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
    new_tokens, param = {"sequence": (body.generation.max_new_tokens, "generation.max_new_tokens"),
                         "on_policy": (body.on_policy.max_new_tokens, "on_policy.max_new_tokens")}.get(
        body.method, (None, None))
    limit = teacher_context if body.method == "sequence" else context
    if new_tokens is not None and limit is not None and new_tokens >= limit:
        who = "teacher's" if body.method == "sequence" else "models'"
        raise Unprocessable(f"{param} is {new_tokens} but the {who} context is {limit} tokens", param=param)


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


def _resolve_teachers(session: Session, tenant: str, body: JobCreate) -> ModelRef:
    """Resolve every teacher; several must agree (task, classes, tokenizer). Returns the first."""
    if (body.teacher is None) == (body.teachers is None):
        raise Unprocessable("give exactly one of teacher or teachers", param="teacher")
    try:
        check_combinations(body, len(body.teachers or ()) or 1)
    except SpecError as exc:
        raise Unprocessable(exc.message, param=exc.param) from None
    resolved = []
    for param, ref, _ in body.teacher_refs():
        teacher = resolve_model(session, tenant, ref, param)
        _check_teacher_task(body, teacher, param)
        resolved.append((param, teacher))
    first = resolved[0][1]
    for param, other in resolved[1:]:
        if body.task == "classification":
            a, b = first.details["architecture"], other.details["architecture"]
            if (a["input_dim"], a["num_classes"]) != (b["input_dim"], b["num_classes"]):
                raise Unprocessable(f"{param} takes {b['input_dim']} features and has {b['num_classes']} classes; "
                                    f"teachers[0] takes {a['input_dim']} and has {a['num_classes']}: every teacher "
                                    "needs the same inputs and label set", param=param, code="mismatch")
        elif body.task == "text_classification":
            if first.details.get("num_labels") != other.details.get("num_labels"):
                raise Unprocessable(f"{param} has {other.details.get('num_labels')} labels, teachers[0] has "
                                    f"{first.details.get('num_labels')}: every teacher needs the same label set",
                                    param=param, code="mismatch")
        else:
            try:
                shared_vocab_size(load_tokenizer(first.path), load_tokenizer(other.path),
                                  first.details["vocab_size"], other.details["vocab_size"])
            except DistillError as exc:
                raise Unprocessable(f"{param}: several causal-LM teachers must share one tokenizer: {exc.message}",
                                    param=param, code="mismatch") from None
    return first


def _referenced_file_ids(body: JobCreate) -> list[str]:
    teachers = [body.teacher] if body.teacher is not None else list(body.teachers or ())
    models = [t.file_id for t in teachers] + [body.student.file_id]
    return [i for i in models + [body.training_file, body.validation_file] if i]


def check_submission(session: Session, tenant: str, body: JobCreate) -> None:
    """The checks the files' metadata allows at submit time; the worker checks the data itself."""
    prefetch_files(session, tenant, _referenced_file_ids(body))  # one query; the resolves below read the session
    _check_prefetched(session, tenant, body)


def _check_prefetched(session: Session, tenant: str, body: JobCreate) -> None:
    teacher = _resolve_teachers(session, tenant, body)
    if body.task == "classification":
        _check_tabular(session, tenant, body, teacher)
    else:
        _check_text(session, tenant, body, teacher)


def add_event(session: Session, job_id: str, type: str, message: str = "", data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, type=type, message=message, data=data or {}))


def prepare_job(session: Session, tenant: str, body: JobCreate) -> Job:
    """Check the spec against its files and build the job (not added to any session). The check only
    reads: its transaction ends here, so the connection goes back to the pool while the job waits
    for its batch (:func:`submit_job`)."""
    check_submission(session, tenant, body)
    session.rollback()
    return _new_job(tenant, body)


def _new_job(tenant: str, body: JobCreate) -> Job:
    return Job(id=new_id("job"), tenant_id=tenant, status="queued", spec=body.model_dump(mode="json"),
               progress={"epoch": 0, "step": 0, "total_steps": 0}, metrics={}, result_files=[], attempts=0,
               cancel_requested=False)


def prepare_new_job(tenant: str, body: JobCreate) -> Job:
    """:func:`prepare_job` in a session of its own (a submit with no request session: the hot path)."""
    session = new_session()
    try:
        return prepare_job(session, tenant, body)
    finally:
        session.close()


def prepare_without_io(tenant: str, body: JobCreate) -> Job | None:
    """:func:`prepare_job` when it needs neither the database nor the disk, so it may run on the event
    loop: a tabular job whose files (teachers and data) this process has cached, where the checks are
    arithmetic on their metadata (a few hundred microseconds; a trip through the thread pool cost more,
    and waited behind the reads). None for any other job: prepare it in a worker thread."""
    if body.task != "classification" or (body.teacher is None) == (body.teachers is None):
        return None
    if any(not ref.get("file_id") for _, ref, _ in body.teacher_refs()):
        return None  # a finished model or a server path: read from the database or the disk
    files = cached_files(tenant, _referenced_file_ids(body))
    if files is None:
        return None
    session = new_session()  # opens no connection: the resolves below find every file in session.info
    try:
        session.info["files"] = files
        _check_prefetched(session, tenant, body)
    finally:
        session.close()
    return _new_job(tenant, body)


@dataclass
class _Submit:
    job: Job
    idempotency_key: str | None


_batcher: MicroBatcher | None = None


def _submit_batcher() -> MicroBatcher:
    global _batcher
    if _batcher is None:
        settings = get_settings()
        # No waiting for company: a batch is whatever queued while the previous one committed.
        _batcher = MicroBatcher(max_batch=settings.submit_max_batch, max_wait_s=0.0,
                                max_pending=settings.submit_max_pending, threads=2)
    return _batcher


async def submit_job(job: Job, idempotency_key: str | None) -> JobPublic:
    """Queue a prepared job: it joins its tenant's next batch (:func:`_admit`), which inserts it,
    counts it against the tenant's quota (429), records its idempotent response and commits; then the
    batch is published (:func:`_publish`). Returns its public form with its place in the queue, once
    its message is with the broker (503 if the broker refused it: the job is then marked failed)."""
    position, public, published = await _submit_batcher().submit(job.tenant_id, [_Submit(job, idempotency_key)],
                                                                 _admit)
    # shielded: a client that goes away must not cancel its batch's publish for the others
    failed = await asyncio.shield(asyncio.wrap_future(published))
    if job.id in failed:
        raise failed[job.id]
    return public or job_public(job, position)  # written here, in the request, not in the batch


def _admit(batch: list[list[_Submit]]) -> list[tuple[int, JobPublic | None, Future] | Exception]:
    """One tenant's concurrent submits, in arrival order, as one transaction: inserted with their
    first events; then, under the tenant's quota lock, counted with the tenant's other queued and
    running jobs, those past the quota removed again (429), the queue positions read and the
    idempotent responses recorded; one commit. The
    admitted jobs are handed to the publishing thread (:func:`_publish`) and the next batch starts:
    the tenant's submits wait in line for the transaction only, not for the broker.

    Per admitted job: (its place in the queue, its public form if it was written here for an
    idempotent response, the future of its batch's publish)."""
    submits = [rows[0] for rows in batch]
    tenant, now = submits[0].job.tenant_id, utcnow()
    results: dict[str, tuple | Exception] = {}
    for i, submit in enumerate(submits):
        # distinct, increasing times: the batch's order is its order in the queue
        submit.job.created_at = submit.job.heartbeat_at = now + timedelta(microseconds=i)
        # heartbeat_at of a queued job = when it was published (the reconciler re-sends)
    with session_scope() as session:
        # Written first, counted after: the quota lock is held from the count to the commit only (another
        # API process's batch of this tenant waits on it). Two multi-row INSERTs (the jobs, then their
        # first events), not the unit of work's flush of objects: it cost a third of a batch's time.
        session.execute(insert(Job), [_row(submit.job) for submit in submits])
        session.execute(insert(JobEvent), [{"job_id": submit.job.id, "type": "stage", "message": "job queued",
                                            "data": {"stage": "queued"}} for submit in submits])
        # the batch is the queue's tail, in order: one count for its first job, with the quota's
        first = submits[0].job
        active, place = quotas.lock_and_count_running_jobs(session, tenant, extra=len(submits),
                                                           position_of=(first.created_at, first.id))
        others = active - len(submits)  # the count sees this transaction's own jobs
        room = max(0, get_settings().tenant_max_running_jobs - others)
        admitted, refused = submits[:room], submits[room:]
        if refused:  # past the quota: these are not queued after all (their events go with them)
            session.execute(delete(JobEvent).where(JobEvent.job_id.in_([s.job.id for s in refused])))
            session.execute(delete(Job).where(Job.id.in_([s.job.id for s in refused])))
        for submit in refused:
            results[submit.job.id] = quotas.too_many_running_jobs(others + len(admitted))
        keyed = {submit.job.id: job_public(submit.job, place + i) for i, submit in enumerate(admitted)
                 if submit.idempotency_key is not None}
        idempotency.record(session, tenant, [(submit.idempotency_key, 201, keyed[submit.job.id].model_dump(mode="json"))
                                             for submit in admitted if submit.idempotency_key is not None])
    if admitted:
        # committed: the worker must see the row before it sees the message
        published = _publisher().submit(_publish, [submit.job.id for submit in admitted])
        for i, submit in enumerate(admitted):
            results[submit.job.id] = (place + i, keyed.get(submit.job.id), published)
    return [results[submit.job.id] for submit in submits]


_publishing: ThreadPoolExecutor | None = None


def _publisher() -> ThreadPoolExecutor:
    """One thread publishes the committed batches, one after the other: the broker gets them in the
    order they were committed (FIFO), while the next batch's transaction runs."""
    global _publishing
    if _publishing is None:
        _publishing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
    return _publishing


def _publish(job_ids: list[str]) -> dict[str, Exception]:
    """Publish a committed batch; {job id: the 503 to answer} for each job the broker refused, which is
    marked failed first."""
    return {job_id: _publish_failed(job_id, exc) for job_id, exc in enqueue_jobs(job_ids).items()}


def _row(job: Job) -> dict:
    """A transient job's column values as set (the table's defaults fill in the rest)."""
    return {column.key: job.__dict__[column.key] for column in Job.__table__.columns if column.key in job.__dict__}


def _publish_failed(job_id: str, exc: Exception) -> Unavailable:
    """The broker refused the job's message: say so now rather than leave a job nobody will run."""
    log.error("could not enqueue %s: %s", job_id, exc)
    error = {"code": "queue_unavailable", "message": str(exc), "param": None}
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
            status="failed", finished_at=utcnow(), error=error))
        add_event(session, job_id, "stage", f"job failed: {exc}", {"stage": "failed", "error": error})
        webhooks.job_changed(session, job_id)
    return Unavailable(f"the job queue is unavailable ({exc}); job {job_id} was marked failed")


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
        webhooks.job_changed(session, job_id)
    else:
        dead_before = now - timedelta(seconds=get_settings().heartbeat_timeout_s)
        if session.execute(update(Job).where(Job.id == job_id, Job.status == "running",
                                             Job.heartbeat_at < dead_before).values(
                status="cancelled", finished_at=now, cancel_requested=True)).rowcount == 1:
            add_event(session, job_id, "stage", "job cancelled (its worker was lost)", {"stage": "cancelled"})
            webhooks.job_changed(session, job_id)
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


_QUEUED = aliased(Job, name="queued")


def _position_of(job) -> ScalarSelect[int]:
    """The place in the queue of ``job`` (the Job table, or a loaded Job): how many queued jobs were
    created before it or with it, itself included. One FIFO across all tenants, by ``created_at``
    then id: the workers take jobs off one broker queue in the order they were published, whoever
    submitted them, so a job's place counts every queued job ahead of it (other tenants' too; only
    their number is shown). A job handed back by a lost worker keeps its place by creation time (an
    approximation: the broker may hand it out later). An index range count on (status, created_at, id)."""
    return select(func.count()).select_from(_QUEUED).where(
        _QUEUED.status == "queued", tuple_(_QUEUED.created_at, _QUEUED.id) <= tuple_(job.created_at, job.id)
    ).scalar_subquery()


@lru_cache
def _job_with_position():
    """SELECT the job's columns and, while it is queued, its place: built once (building the correlated
    subquery costs more Python than running it), parameters bound per call. Core, not the ORM: a GET
    reads a row and writes JSON, and loading an entity into a session cost more than the query."""
    jobs = Job.__table__
    queued = jobs.alias("queued")
    position = select(func.count()).select_from(queued).where(
        queued.c.status == "queued", tuple_(queued.c.created_at, queued.c.id) <= tuple_(jobs.c.created_at, jobs.c.id)
    ).scalar_subquery()
    return select(jobs, case((jobs.c.status == "queued", position), else_=None).label("queue_position")).where(
        jobs.c.id == bindparam("job_id"), jobs.c.tenant_id == bindparam("tenant"))


def read_job_with_position(tenant: str, job_id: str) -> tuple[SimpleNamespace, int | None]:
    """The job (its columns, by attribute) and, while it is queued, its place in the queue: one query,
    one round trip (``db.read_row``). Blocking: call it from a worker thread. 404 if the tenant has no
    such job."""
    row = read_row(_job_with_position(), {"job_id": job_id, "tenant": tenant}) if is_id(job_id) else None
    if row is None:
        raise NotFound(f"no distillation job with id {job_id!r}", param="job_id")
    position = row.pop("queue_position")
    return SimpleNamespace(**row), position


def queue_positions(session: Session, job_ids: list[str]) -> dict[str, int]:
    """{job id: place in the queue} for those of ``job_ids`` that are queued; 1 = next to run
    (see :func:`_position_of`): one query, one index range count per queued job."""
    if not job_ids:
        return {}
    rows = session.execute(select(Job.id, _position_of(Job)).where(Job.id.in_(job_ids), Job.status == "queued")).all()
    return {job_id: int(position) for job_id, position in rows}
