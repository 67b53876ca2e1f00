"""Resolve the model and file references of a job spec (``file_id``, ``model_id``,
``path``) to what they hold and where it lies. Used at submit time to check a spec and
by the worker to hand the engine local paths. A submit first looks up every file it names
(:func:`prefetch_files`): from this process's cache of file metadata, which an upload fixes for the
file's life, else in one query; the lookups then answer from the session. A delete empties the
caches (:func:`forget_file`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from distill.errors import ModelFormatError
from distill.kinds import ModelKind, get_kind, kind_of_path

from .. import storage_keys
from ..config import Settings, get_settings
from ..errors import Unprocessable
from ..storage import get_storage
from ..tables import FileRecord, Job, ModelRecord
from .common import is_id, shown_id
from .hot_cache import TtlCache, bump_marker


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
        record = _file(session, tenant, ref["file_id"])
        if record is None:
            raise Unprocessable(f"no file with id {shown_id(ref['file_id'])}", param=f"{param}.file_id")
        if record.purpose != "model":
            raise Unprocessable(f"file {ref['file_id']!r} has purpose {record.purpose!r}, not 'model'",
                                param=f"{param}.file_id")
        # an uploaded HF archive is served from its unpacked folder (a storage key recorded at upload)
        path = record.local_path if isinstance(record, FileInfo) else \
            get_storage().local_path(record.details.get("model_dir") or record.storage_key)
        return ModelRef(record.kind or "mlp", record.details, path)
    if ref.get("model_id"):
        model = session.get(ModelRecord, ref["model_id"]) if is_id(ref["model_id"]) else None
        if model is None or model.tenant_id != tenant:
            raise Unprocessable(f"no model with id {shown_id(ref['model_id'])}", param=f"{param}.model_id")
        return ModelRef(model.kind, model_details(model), model_path(model))
    if ref.get("path"):
        return _server_path(ref["path"], f"{param}.path")
    raise Unprocessable("give exactly one of file_id, model_id or path", param=param)


@dataclass(frozen=True)
class FileInfo:
    """What a submit checks of an uploaded file: fields set at upload and never changed (a copy, safe
    to share between requests and threads)."""

    id: str
    tenant_id: str
    purpose: str
    kind: str | None
    details: dict
    storage_key: str

    @cached_property
    def local_path(self) -> Path:  # the model file, or an uploaded archive's unpacked folder
        return get_storage().local_path(self.details.get("model_dir") or self.storage_key)


_cache: tuple[Settings, TtlCache] | None = None


def _file_cache() -> TtlCache:
    """(tenant, file id) -> :class:`FileInfo`, made anew when the settings are (tests reload them)."""
    global _cache
    settings = get_settings()
    if _cache is None or _cache[0] is not settings:
        marker = Path(settings.artifacts_dir).resolve() / ".invalidate" / "files"
        _cache = (settings, TtlCache(settings.file_cache_s, marker=marker))
    return _cache[1]


def forget_file(session: Session, tenant: str, file_id: str) -> None:
    """A file is being deleted in ``session``: this process forgets it now, every process sharing the
    artifacts folder once the delete commits (see ``hot_cache``)."""
    cache = _file_cache()
    cache.discard(lambda key: key == (tenant, file_id))
    event.listen(session, "after_commit", lambda _session: (cache.clear(), bump_marker(cache.marker)), once=True)


def prefetch_files(session: Session, tenant: str, file_ids: list[str]) -> None:
    """Look up the tenant's files among ``file_ids``: from the cache, the rest in one query; kept in the
    session (``session.info``), where the ``resolve_*`` calls that follow find them."""
    wanted = sorted({i for i in file_ids if is_id(i)})
    cache = _file_cache()
    found = _cached(cache, tenant, wanted)
    missing = [file_id for file_id in wanted if file_id not in found]
    if missing:
        generation = cache.generation()
        for record in session.scalars(select(FileRecord).where(FileRecord.id.in_(missing),
                                                               FileRecord.tenant_id == tenant)):
            info = FileInfo(record.id, record.tenant_id, record.purpose, record.kind, record.details,
                            record.storage_key)
            found[record.id] = info
            cache.put((tenant, record.id), info, generation=generation)
    session.info["files"] = found


def cached_files(tenant: str, file_ids: list[str]) -> dict[str, FileInfo] | None:
    """{file id: FileInfo} if this process has every one of the tenant's ``file_ids`` cached; else None."""
    wanted = set(file_ids)
    found = _cached(_file_cache(), tenant, wanted)
    return found if len(found) == len(wanted) else None


def _cached(cache: TtlCache, tenant: str, file_ids) -> dict[str, FileInfo]:
    return {file_id: info for (_, file_id), info in cache.get_many([(tenant, i) for i in file_ids]).items()}


def _file(session: Session, tenant: str, file_id: str) -> FileInfo | FileRecord | None:
    """The tenant's file ``file_id`` as prefetched, else from the database; None if it has no such file."""
    if not is_id(file_id):
        return None
    prefetched = session.info.get("files")
    if prefetched is not None and file_id in prefetched:
        return prefetched[file_id]
    record = session.get(FileRecord, file_id)
    return record if record is not None and record.tenant_id == tenant else None


def resolve_dataset(session: Session, tenant: str, file_id: str, param: str) -> FileInfo | FileRecord:
    record = _file(session, tenant, file_id)
    if record is None:
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
