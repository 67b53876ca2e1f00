"""Resolve the model and file references of a job spec (``file_id``, ``model_id``,
``path``) to what they hold and where it lies. Used at submit time to check a spec and
by the worker to hand the engine local paths. A submit first loads every file it names in one
query (:func:`prefetch_files`); the lookups then answer from the session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from distill.errors import ModelFormatError
from distill.kinds import ModelKind, get_kind, kind_of_path

from .. import storage_keys
from ..config import get_settings
from ..errors import Unprocessable
from ..storage import get_storage
from ..tables import FileRecord, Job, ModelRecord
from .common import is_id, shown_id


@dataclass
class ModelRef:
    kind: str  # a distill.kinds name: "mlp" | "hf"
    details: dict  # what the kind's inspect() said: task, parameters, num_labels, context_length, ...
    path: Path  # the model file or Hugging Face directory the engine loads

    @property
    def model_kind(self) -> ModelKind:
        return get_kind(self.kind)

    @property
    def task(self) -> str | None:
        return self.details.get("task")


def model_path(record: ModelRecord) -> Path:
    """A finished model's loadable form: its model file, or its unpacked Hugging Face directory."""
    storage = get_storage()
    return storage.local_path(storage_keys.model_dir(record.id) if get_kind(record.kind).export_format == "hf"
                              else record.storage_key)


def model_details(model: ModelRecord) -> dict:
    """A finished model described like an uploaded one (what its kind's inspect() gives)."""
    if model.kind == "hf":
        return {**model.architecture, "task": model.task}
    return {"architecture": model.architecture, "parameters": model.parameters, "task": model.task,
            "num_labels": model.architecture.get("num_classes")}


def _server_path(raw: str, param: str) -> ModelRef:
    root = get_settings().models_dir
    if root is None:
        raise Unprocessable("server-side model paths are disabled; the operator sets DISTILL_MODELS_DIR", param=param)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):  # a NUL makes resolve() raise ValueError
        raise Unprocessable("a model path may not contain NUL or control characters", param=param)
    root = Path(root).resolve()
    path = (root / raw).resolve()
    if path != root and root not in path.parents:
        raise Unprocessable(f"{raw!r} is outside the allowed models directory", param=param)
    if not path.exists():
        raise Unprocessable(f"no model at {raw!r} under the models directory", param=param)
    kind = kind_of_path(path)
    try:
        return ModelRef(kind.name, kind.inspect(path), path)
    except ModelFormatError as exc:
        raise Unprocessable(f"invalid model at {raw!r}: {exc.message}", param=param, code=exc.code) from None


def resolve_model(session: Session, tenant: str, ref: dict, param: str) -> ModelRef:
    """``ref`` is {"file_id"} | {"model_id"} | {"path"}; 422 naming ``param`` if it doesn't resolve."""
    if ref.get("file_id"):
        record = session.get(FileRecord, ref["file_id"]) if is_id(ref["file_id"]) else None
        if record is None or record.tenant_id != tenant:
            raise Unprocessable(f"no file with id {shown_id(ref['file_id'])}", param=f"{param}.file_id")
        if record.purpose != "model":
            raise Unprocessable(f"file {ref['file_id']!r} has purpose {record.purpose!r}, not 'model'",
                                param=f"{param}.file_id")
        # an uploaded HF archive is served from its unpacked folder (a storage key recorded at upload)
        key = record.details.get("model_dir") or record.storage_key
        return ModelRef(record.kind or "mlp", record.details, get_storage().local_path(key))
    if ref.get("model_id"):
        model = session.get(ModelRecord, ref["model_id"]) if is_id(ref["model_id"]) else None
        if model is None or model.tenant_id != tenant:
            raise Unprocessable(f"no model with id {shown_id(ref['model_id'])}", param=f"{param}.model_id")
        return ModelRef(model.kind, model_details(model), model_path(model))
    if ref.get("path"):
        return _server_path(ref["path"], f"{param}.path")
    raise Unprocessable("give exactly one of file_id, model_id or path", param=param)


def prefetch_files(session: Session, tenant: str, file_ids: list[str]) -> None:
    """Load the tenant's files among ``file_ids`` in one query, into the session's identity map, so the
    ``resolve_*`` calls that follow (``session.get``) answer from memory instead of one query each."""
    wanted = sorted({i for i in file_ids if is_id(i)})
    if wanted:
        # held by the session: its identity map keeps objects only while something references them
        session.info["prefetched_files"] = session.scalars(
            select(FileRecord).where(FileRecord.id.in_(wanted), FileRecord.tenant_id == tenant)).all()


def resolve_dataset(session: Session, tenant: str, file_id: str, param: str) -> FileRecord:
    record = session.get(FileRecord, file_id) if is_id(file_id) else None
    if record is None or record.tenant_id != tenant:
        raise Unprocessable(f"no file with id {shown_id(file_id)}", param=param)
    if record.purpose != "dataset":
        raise Unprocessable(f"file {file_id!r} has purpose {record.purpose!r}, not 'dataset'", param=param)
    return record


def dataset_path(record: FileRecord) -> Path:
    return get_storage().local_path(record.storage_key)


def active_job_referencing(session: Session, tenant: str, id_field: str, value: str) -> tuple[str, str] | None:
    """(job id, role) of a queued or running job of ``tenant`` whose spec names ``value`` as its
    ``id_field`` ("file_id" | "model_id") in a role: teacher, student, training_file, validation_file."""
    jobs = session.scalars(select(Job).where(Job.tenant_id == tenant, Job.status.in_(("queued", "running")))).all()
    for job in jobs:
        refs = {"teacher": job.spec.get("teacher") or {}, "student": job.spec.get("student") or {},
                "training_file": {"file_id": job.spec.get("training_file")},
                "validation_file": {"file_id": job.spec.get("validation_file")}}
        for role, ref in refs.items():
            if ref.get(id_field) == value:
                return job.id, role
    return None
