"""Uploaded files: stored, hashed and validated on the way in."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from distill import safe_json
from distill.archive import detect_archive_format, extract_archive
from distill.data import load_dataset
from distill.errors import ArchiveError, DataError, ModelFormatError
from distill.kinds import get_kind
from distill.text_data import inspect_text_dataset

from ..config import get_settings
from ..errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from .. import storage_keys
from ..storage import TooLarge, get_storage, work_root
from ..tables import FileRecord, new_id
from .common import is_id, paginate, shown_id
from .references import active_job_referencing, forget_file



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
                    first = safe_json.loads(raw)
                except ValueError:  # invalid, too deep, a 5000-digit number: the dataset parser names the line
                    return False
                return isinstance(first, dict) and ("text" in first or "prompt" in first)
    return False


def _validate_dataset(path: Path) -> dict:
    settings = get_settings()
    if _is_text_dataset(path):
        return inspect_text_dataset(path, max_rows=settings.max_dataset_rows)
    return load_dataset(path, max_rows=settings.max_dataset_rows, max_columns=settings.max_dataset_columns).summary()


def _store_model_archive(path: Path, file_id: str) -> dict:
    """Unpack and inspect a Hugging Face model archive in local scratch, then store the folder
    (an invalid archive never reaches storage). ``model_dir`` is the storage key of the model
    directory: the unpacked folder, or the archive's single top-level folder inside it."""
    key = storage_keys.file_model_dir(file_id)
    scratch_root = work_root() / "tmp"  # on the artifacts' filesystem by default, so save_dir is a rename
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
        unpacked = Path(scratch) / "model"
        model_dir = extract_archive(path, unpacked, get_settings().extracted_bytes_limit)
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


def _clean_filename(filename: str) -> str:
    """The name as shown back: no control characters (PostgreSQL refuses a NUL in a string), no lone
    surrogates (they cannot be encoded), at most 512 characters."""
    cleaned = "".join(c for c in filename if c.isprintable() or c == " ")
    return cleaned.encode("utf-8", "replace").decode("utf-8")[:512] or "upload"


def create_file(session: Session, tenant: str, source: BinaryIO, filename: str, purpose: str) -> FileRecord:
    """Store, validate and record an upload. Whatever fails on the way (a refusal, or a bug), the
    file's folder (its bytes and any unpacked archive) is removed: a refused upload keeps nothing."""
    file_id = new_id("file")
    try:
        record = _create_file(session, tenant, file_id, source, _clean_filename(filename), purpose)
    except BaseException:
        get_storage().delete(storage_keys.file_folder(file_id))
        raise
    _delete_if_rolled_back(session, file_id)
    return record


def _delete_if_rolled_back(session: Session, file_id: str) -> None:
    """The bytes live as long as the row: if the transaction that adds the row is rolled back (a
    later step of the request failed, or its commit did), the file's folder is removed as well."""
    state = {"committed": False}

    def committed(_session: Session) -> None:
        state["committed"] = True

    def rolled_back(_session: Session) -> None:
        if not state["committed"]:
            get_storage().delete(storage_keys.file_folder(file_id))

    event.listen(session, "after_commit", committed, once=True)
    event.listen(session, "after_rollback", rolled_back, once=True)


def _create_file(session: Session, tenant: str, file_id: str, source: BinaryIO, filename: str,
                 purpose: str) -> FileRecord:
    storage = get_storage()
    key = storage_keys.file_content(file_id, _suffix(filename))
    limit = get_settings().max_upload_bytes
    try:
        size, sha256 = storage.save_stream(key, source, max_bytes=limit)
    except TooLarge:
        raise PayloadTooLarge(f"the file is larger than the {limit}-byte upload limit", param="file") from None
    if size == 0:
        raise Unprocessable("the file is empty", param="file")
    details = _validate(storage.local_path(key), purpose, filename, file_id)
    kind = details.get("format") if purpose == "model" else None  # the kind's inspect() names it
    record = FileRecord(id=file_id, tenant_id=tenant, filename=filename, purpose=purpose, bytes=size,
                        sha256=sha256, storage_key=key, details=details, kind=kind)
    session.add(record)
    session.flush()
    return record


def content_path(record: FileRecord) -> Path:
    return get_storage().local_path(record.storage_key)


def get_file(session: Session, tenant: str, file_id: str) -> FileRecord:
    record = session.get(FileRecord, file_id) if is_id(file_id) else None
    if record is None or record.tenant_id != tenant:
        raise NotFound(f"no file with id {shown_id(file_id)}", param="file_id")
    return record


def list_files(session: Session, tenant: str, purpose: str | None, after: str | None, limit: int):
    query = select(FileRecord).where(FileRecord.tenant_id == tenant)
    if purpose is not None:
        query = query.where(FileRecord.purpose == purpose)
    return paginate(session, FileRecord, query, after, limit, tenant=tenant)


def delete_file(session: Session, tenant: str, file_id: str) -> None:
    record = get_file(session, tenant, file_id)
    user = active_job_referencing(session, tenant, "file_id", file_id)
    if user is not None:
        raise Conflict(f"file {file_id!r} is in use by {user[0]}, which is still queued or running",
                       param="file_id")
    session.delete(record)
    session.flush()
    forget_file(session, tenant, file_id)  # no submit may pass its checks on a cached copy
    get_storage().delete(storage_keys.file_folder(file_id))
