from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from ...schemas import Deleted, FilePublic, FilePurpose, FilesPublic
from ...services import files as service
from ...services.common import page, unix
from ...tables import FileRecord
from ..deps import CurrentTenant, SessionDep

router = APIRouter(prefix="/files", tags=["files"])


def public(record: FileRecord) -> FilePublic:
    return FilePublic(id=record.id, filename=record.filename, bytes=record.bytes, sha256=record.sha256,
                      purpose=record.purpose, created_at=unix(record.created_at), details=record.details,
                      kind=record.kind)


@router.post("", status_code=201, response_model=FilePublic)
async def upload_file(session: SessionDep, tenant: CurrentTenant, file: Annotated[UploadFile, File()],
                      purpose: Annotated[FilePurpose, Form()]) -> FilePublic:
    """Upload a dataset (CSV / JSONL) or a model (.safetensors); it is validated before it is kept."""
    record = await run_in_threadpool(service.create_file, session, tenant, file.file, file.filename or "upload",
                                     purpose)
    return public(record)


@router.get("", response_model=FilesPublic)
def list_files(session: SessionDep, tenant: CurrentTenant, purpose: FilePurpose | None = None,
               after: str | None = None, limit: Annotated[int, Query()] = 20) -> FilesPublic:
    rows, has_more = service.list_files(session, tenant, purpose, after, limit)
    data = [public(r) for r in rows]
    return FilesPublic(**page(data, has_more))


@router.get("/{file_id}", response_model=FilePublic)
def get_file(session: SessionDep, tenant: CurrentTenant, file_id: str) -> FilePublic:
    return public(service.get_file(session, tenant, file_id))


@router.get("/{file_id}/content", response_class=FileResponse)
def download_file(session: SessionDep, tenant: CurrentTenant, file_id: str) -> FileResponse:
    """The file's bytes as uploaded (or as generated, for a job's result file)."""
    record = service.get_file(session, tenant, file_id)
    return FileResponse(service.content_path(record), media_type="application/octet-stream",
                        filename=record.filename)


@router.delete("/{file_id}", response_model=Deleted)
def delete_file(session: SessionDep, tenant: CurrentTenant, file_id: str) -> Deleted:
    service.delete_file(session, tenant, file_id)
    return Deleted(id=file_id, object="file")
