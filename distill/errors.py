"""Errors the engine raises. Every one carries a stable ``code``, a human ``message``
and, where a single input is to blame, the ``param`` that names it, so the service
can turn it into a job's ``error`` (or a 4xx) without parsing text.

    DistillError                 base: code, message, param
    ├── SpecError                the job spec itself is invalid          (invalid_spec)
    ├── DataError                a dataset file is unreadable or invalid (invalid_dataset)
    ├── ModelFormatError         a model file is unreadable or invalid   (invalid_model)
    │   └── ArchiveError         an uploaded archive is unsafe/invalid   (invalid_archive)
    ├── MismatchError            teacher, student and data don't fit     (mismatch)
    │   └── VocabularyMismatch   teacher and student tokenizers differ   (vocabulary_mismatch)
    └── JobStopped               should_stop() asked the loop to stop    (cancelled)
"""

from __future__ import annotations

__all__ = [
    "DistillError",
    "SpecError",
    "DataError",
    "ModelFormatError",
    "MismatchError",
    "JobStopped",
    "ArchiveError",
    "VocabularyMismatch",
]


class DistillError(Exception):
    code = "distill_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}


class SpecError(DistillError):
    code = "invalid_spec"


class DataError(DistillError):
    code = "invalid_dataset"

    def __init__(self, message: str, param: str | None = None, line: int | None = None):
        super().__init__(message, param)
        self.line = line  # 1-based line of the file, header included


class ModelFormatError(DistillError):
    code = "invalid_model"

    def __init__(self, message: str, param: str | None = None, tensor: str | None = None):
        super().__init__(message, param)
        self.tensor = tensor


class MismatchError(DistillError):
    code = "mismatch"


class JobStopped(DistillError):
    code = "cancelled"


class ArchiveError(ModelFormatError):
    """An uploaded model archive is unreadable, or an entry in it is unsafe (the message names the entry)."""

    code = "invalid_archive"


class VocabularyMismatch(MismatchError):
    """Token-level distillation needs one tokenizer; the teacher's and the student's differ."""

    code = "vocabulary_mismatch"
