"""Uploaded files: stored, hashed and validated on the way in."""

from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from distill.data import load_dataset
from distill.errors import DataError, ModelFormatError
from distill.models import load_model

from ..config import get_settings
from ..errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from ..storage import TooLarge, get_storage
from ..tables import FileRecord, Job, new_id
from .common import paginate

ACTIVE = ("queued", "running")


def _suffix(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,16}", suffix) else ""


def _validate(path: Path, purpose: str) -> dict:
    """What the file holds, or Unprocessable naming the line / tensor at fault."""
    try:
        if purpose == "dataset":
            return load_dataset(path, max_rows=get_settings().max_dataset_rows).summary()
        model = load_model(path)
        return {"architecture": model.architecture.to_dict(), "parameters": model.architecture.num_parameters}
    except DataError as exc:
        raise Unprocessable(f"invalid dataset: {exc.message}", param="file", code=exc.code, line=exc.line) from None
    except ModelFormatError as exc:
        raise Unprocessable(f"invalid model file: {exc.message}", param="file", code=exc.code,
                            tensor=exc.tensor) from None


def create_file(session: Session, tenant: str, source: BinaryIO, filename: str, purpose: str) -> FileRecord:
    storage = get_storage()
    file_id = new_id("file")
    key = f"files/{file_id}/content{_suffix(filename)}"
    limit = get_settings().max_upload_bytes
    try:
        size, sha256 = storage.save_stream(key, source, max_bytes=limit)
    except TooLarge:
        raise PayloadTooLarge(f"the file is larger than the {limit}-byte upload limit", param="file") from None
    if size == 0:
        storage.delete(f"files/{file_id}")
        raise Unprocessable("the file is empty", param="file")
    try:
        details = _validate(storage.local_path(key), purpose)
    except Unprocessable:
        storage.delete(f"files/{file_id}")
        raise
    record = FileRecord(id=file_id, tenant_id=tenant, filename=filename[:512], purpose=purpose, bytes=size,
                        sha256=sha256, storage_key=key, details=details)
    session.add(record)
    session.flush()
    return record


def get_file(session: Session, tenant: str, file_id: str) -> FileRecord:
    record = session.get(FileRecord, file_id)
    if record is None or record.tenant_id != tenant:
        raise NotFound(f"no file with id {file_id!r}", param="file_id")
    return record


def list_files(session: Session, tenant: str, purpose: str | None, after: str | None, limit: int):
    query = select(FileRecord).where(FileRecord.tenant_id == tenant)
    if purpose is not None:
        query = query.where(FileRecord.purpose == purpose)
    return paginate(session, FileRecord, query, after, limit)


def _referenced_by_active_job(session: Session, tenant: str, file_id: str) -> str | None:
    jobs = session.scalars(select(Job).where(Job.tenant_id == tenant, Job.status.in_(ACTIVE))).all()
    for job in jobs:
        refs = (job.spec.get("training_file"), job.spec.get("validation_file"), job.spec["teacher"].get("file_id"))
        if file_id in refs:
            return job.id
    return None


def delete_file(session: Session, tenant: str, file_id: str) -> None:
    record = get_file(session, tenant, file_id)
    job_id = _referenced_by_active_job(session, tenant, file_id)
    if job_id is not None:
        raise Conflict(f"file {file_id!r} is in use by {job_id}, which is still queued or running",
                       param="file_id")
    session.delete(record)
    session.flush()
    get_storage().delete(f"files/{file_id}")
