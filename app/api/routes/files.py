from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from ...errors import PayloadTooLarge
from ...openapi import BINARY, errors
from ...schemas import Deleted, FilePublic, FilePurpose, FilesPublic
from ...services import files as service
from ...services import idempotency, quotas
from ...services.common import page, unix
from ...tables import FileRecord
from ..deps import CurrentTenant, IdempotencyKeyHeader, SessionDep
from ..params import Cursor, FileId

router = APIRouter(prefix="/files", tags=["files"])


def public(record: FileRecord) -> FilePublic:
    return FilePublic(id=record.id, filename=record.filename, bytes=record.bytes, sha256=record.sha256,
                      purpose=record.purpose, created_at=unix(record.created_at), details=record.details,
                      kind=record.kind)


@router.post("", status_code=201, response_model=FilePublic, responses=errors(400, 409, 413))
def upload_file(request: Request, session: SessionDep, tenant: CurrentTenant, file: Annotated[UploadFile, File()],
                purpose: Annotated[FilePurpose, Form()], idempotency_key: IdempotencyKeyHeader = None) -> FilePublic:
    """Upload a dataset (CSV / JSONL) or a model (.safetensors); it is validated before it is kept.
    413 past DISTILL_TENANT_MAX_STORAGE_BYTES of the tenant's files; ``Idempotency-Key`` makes retries safe.
    (A plain ``def``: FastAPI runs it in its thread pool, as hashing, validating and storing block.)"""
    filename = file.filename or "upload"
    fingerprint = idempotency.upload_sha256(request.url.path, file.file, filename=filename, purpose=purpose) \
        if idempotency_key is not None else ""

    def create() -> FilePublic:
        quotas.check_storage(session, tenant, incoming=file.size or 0, lock=False)  # early, before validating
        record = service.create_file(session, tenant, file.file, filename, purpose)
        try:
            quotas.check_storage(session, tenant)  # with its real size, counted in order with racing uploads
        except PayloadTooLarge:
            service.delete_file(session, tenant, record.id)
            raise
        return public(record)

    return idempotency.run(session, tenant, idempotency_key, fingerprint, 201, create)


@router.get("", response_model=FilesPublic, responses=errors())
def list_files(session: SessionDep, tenant: CurrentTenant, purpose: FilePurpose | None = None,
               after: Cursor = None, limit: Annotated[int, Query()] = 20) -> FilesPublic:
    rows, has_more = service.list_files(session, tenant, purpose, after, limit)
    data = [public(r) for r in rows]
    return FilesPublic(**page(data, has_more))


@router.get("/{file_id}", response_model=FilePublic, responses=errors(404))
def get_file(session: SessionDep, tenant: CurrentTenant, file_id: FileId) -> FilePublic:
    return public(service.get_file(session, tenant, file_id))


@router.get("/{file_id}/content", response_class=FileResponse, responses={200: BINARY, **errors(404)})
def download_file(session: SessionDep, tenant: CurrentTenant, file_id: FileId) -> FileResponse:
    """The file's bytes as uploaded (or as generated, for a job's result file)."""
    record = service.get_file(session, tenant, file_id)
    return FileResponse(service.content_path(record), media_type="application/octet-stream",
                        filename=record.filename)


@router.delete("/{file_id}", response_model=Deleted, responses=errors(404, 409))
def delete_file(session: SessionDep, tenant: CurrentTenant, file_id: FileId) -> Deleted:
    service.delete_file(session, tenant, file_id)
    return Deleted(id=file_id, object="file")
