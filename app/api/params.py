"""Path and query parameters that carry ids, checked by shape before any query.

PostgreSQL refuses a NUL byte in a string parameter (a 500 if it got that far) and an id
of 10 kB is never one of ours: a malformed id is a 422 naming the parameter; a well-formed
one that does not exist (or is another tenant's) stays the service's 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from ..schemas import ID_PATTERN

__all__ = ["FileId", "JobId", "ModelId", "Cursor"]

FileId = Annotated[str, Path(pattern=ID_PATTERN, description="A file id (file-…)")]
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="A distillation job id (job-…)")]
ModelId = Annotated[str, Path(pattern=ID_PATTERN, description="A model id (model-…)")]
Cursor = Annotated[str | None, Query(pattern=ID_PATTERN,
                                     description="The id of the last item of the previous page")]
