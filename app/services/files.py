"""Uploaded files: stored, hashed and validated on the way in."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from distill.archive import detect_archive_format, extract_archive
from distill.data import load_dataset
from distill.errors import ArchiveError, DataError, ModelFormatError
from distill.kinds import get_kind
from distill.text_data import inspect_text_dataset

from ..config import get_settings
from ..errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from .. import storage_keys
from ..storage import TooLarge, get_storage, work_root
from ..tables import FileRecord, Job, new_id
from .common import paginate

ACTIVE = ("queued", "running")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _suffix(filename: str) -> str:
    name = filename.lower()
    if name.endswith(".tar.gz"):
        return ".tar.gz"
    suffix = Path(name).suffix
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,16}", suffix) else ""


def _is_text_dataset(path: Path) -> bool:
    """Text JSONL (text / prompt+completion / text+label) rather than tabular features."""
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except ValueError:
                    return False
                return isinstance(first, dict) and ("text" in first or "prompt" in first)
    return False


def _validate_dataset(path: Path) -> dict:
    limit = get_settings().max_dataset_rows
    if _is_text_dataset(path):
        return inspect_text_dataset(path, max_rows=limit)
    return load_dataset(path, max_rows=limit).summary()


def _store_model_archive(path: Path, file_id: str) -> dict:
    """Unpack and inspect a Hugging Face model archive in local scratch, then store the folder
    (an invalid archive never reaches storage). ``model_dir`` is the storage key of the model
    directory: the unpacked folder, or the archive's single top-level folder inside it."""
    key = storage_keys.file_model_dir(file_id)
    scratch_root = work_root() / "tmp"  # on the artifacts' filesystem by default, so save_dir is a rename
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
        unpacked = Path(scratch) / "model"
        model_dir = extract_archive(path, unpacked, get_settings().max_extracted_bytes)
        details = get_kind("hf").inspect(model_dir)
        inner = model_dir.relative_to(unpacked).as_posix()
        get_storage().save_dir(key, unpacked)
    return {**details, "model_dir": key if inner == "." else f"{key}/{inner}"}


def _validate_model(path: Path, filename: str, file_id: str) -> dict:
    """An MLP model file, or an archive of a Hugging Face model directory (stored unpacked beside it)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if filename.lower().endswith(PICKLE_SUFFIXES) or head in PICKLE_MAGIC:
        raise Unprocessable(f"{filename!r} looks like pickled weights, which are never loaded (they can run code); "
                            "convert the model to safetensors", param="file", code="unsafe_model")
    try:
        detect_archive_format(path)
    except ArchiveError:
        return get_kind("mlp").inspect(path)
    return _store_model_archive(path, file_id)


def _is_server_path(value: str) -> bool:
    return PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()


def _without_server_paths(details):
    """``details`` is shown to the user: drop any string that is an absolute filesystem path.
    Nothing the engine returns today holds one; this keeps it so if an inspector starts to.
    Storage keys (``model_dir``) are relative and stay."""
    if isinstance(details, dict):
        return {k: _without_server_paths(v) for k, v in details.items()
                if not (isinstance(v, str) and _is_server_path(v))}
    if isinstance(details, list):
        return [_without_server_paths(v) for v in details if not (isinstance(v, str) and _is_server_path(v))]
    return details


def _validate(path: Path, purpose: str, filename: str, file_id: str) -> dict:
    """What the file holds, or Unprocessable naming the line / tensor / entry at fault."""
    try:
        details = _validate_dataset(path) if purpose == "dataset" else _validate_model(path, filename, file_id)
    except DataError as exc:
        raise Unprocessable(f"invalid dataset: {exc.message}", param="file", code=exc.code, line=exc.line) from None
    except ModelFormatError as exc:
        raise Unprocessable(f"invalid model file: {exc.message}", param="file", code=exc.code,
                            tensor=exc.tensor) from None
    return _without_server_paths(details)


def create_file(session: Session, tenant: str, source: BinaryIO, filename: str, purpose: str) -> FileRecord:
    storage = get_storage()
    file_id = new_id("file")
    key = storage_keys.file_content(file_id, _suffix(filename))
    limit = get_settings().max_upload_bytes
    try:
        size, sha256 = storage.save_stream(key, source, max_bytes=limit)
    except TooLarge:
        raise PayloadTooLarge(f"the file is larger than the {limit}-byte upload limit", param="file") from None
    if size == 0:
        storage.delete(storage_keys.file_folder(file_id))
        raise Unprocessable("the file is empty", param="file")
    try:
        details = _validate(storage.local_path(key), purpose, filename, file_id)
    except Unprocessable:
        storage.delete(storage_keys.file_folder(file_id))
        raise
    kind = details.get("format") if purpose == "model" else None  # the kind's inspect() names it
    record = FileRecord(id=file_id, tenant_id=tenant, filename=filename[:512], purpose=purpose, bytes=size,
                        sha256=sha256, storage_key=key, details=details, kind=kind)
    session.add(record)
    session.flush()
    return record


def content_path(record: FileRecord) -> Path:
    return get_storage().local_path(record.storage_key)


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
        refs = (job.spec.get("training_file"), job.spec.get("validation_file"), job.spec["teacher"].get("file_id"),
                (job.spec.get("student") or {}).get("file_id"))
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
    get_storage().delete(storage_keys.file_folder(file_id))
