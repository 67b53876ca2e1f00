"""Artifact storage behind one small interface, and the local work folder jobs write in.

:class:`Storage` is what the API and workers call; :class:`LocalStorage` implements it
over a folder shared by the API and the workers (today's setup). An S3-compatible store
for workers on other machines implements the same methods: uploads and ``save_*`` put
objects, ``local_path``/``open`` download to a local cache first, ``delete`` removes
every object under a prefix. Keys are spelled only in :mod:`app.storage_keys`.

A job never writes into storage while it runs: it works in :func:`work_dir_for` (a
local scratch folder) and hands finished artifacts over with ``save_file``/``save_dir``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from . import storage_keys
from .config import Settings, get_settings

__all__ = ["Storage", "LocalStorage", "get_storage", "TooLarge", "file_sha256", "work_root", "work_dir_for"]

CHUNK = 1 << 20
NO_LIMIT = 1 << 62


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class TooLarge(Exception):
    """The stream went past the byte limit; nothing was kept."""


@runtime_checkable
class Storage(Protocol):
    """Where uploads and finished models live, by key (see :mod:`app.storage_keys`).

    Writes are whole-object: a reader sees the old object, the new one, or none, never
    half of one. A key names a file or, for ``save_dir``/``delete``, a folder (a prefix).
    """

    def save_stream(self, key: str, source: BinaryIO, max_bytes: int) -> tuple[int, str]:
        """Copy ``source`` to ``key``, hashing on the way; returns (bytes, sha256 hex).
        Raises :class:`TooLarge` past ``max_bytes``, keeping nothing."""

    def save_file(self, key: str, path: Path, *, move: bool = False) -> tuple[int, str]:
        """Store the local file ``path`` at ``key``; returns (bytes, sha256 hex). With
        ``move`` the source may be consumed (a rename where possible, no copy)."""

    def save_dir(self, key: str, path: Path) -> None:
        """Store the finished local folder ``path`` under ``key``, replacing what was there.
        The source folder is consumed (moved; models are too large to copy twice)."""

    def local_path(self, key: str) -> Path:
        """A local path to read ``key`` from (file or folder). LocalStorage returns the
        stored path itself; an object store downloads to a local cache and returns that."""

    def open(self, key: str) -> BinaryIO:
        """The object's bytes, for reading."""

    def exists(self, key: str) -> bool:
        """Whether a file or folder is stored at ``key``."""

    def delete(self, key: str) -> None:
        """Remove the file at ``key``, or everything under it if it is a folder; no error if absent."""


class LocalStorage:
    """:class:`Storage` over a local (or shared network) folder."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def save_stream(self, key: str, source: BinaryIO, max_bytes: int) -> tuple[int, str]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"more than {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return size, digest.hexdigest()

    def save_file(self, key: str, path: Path, *, move: bool = False) -> tuple[int, str]:
        if not move:
            with open(path, "rb") as handle:
                return self.save_stream(key, handle, max_bytes=NO_LIMIT)
        size, sha256 = Path(path).stat().st_size, file_sha256(path)
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        try:  # a rename on the same filesystem, else a copy; the .part keeps the final name whole-or-absent
            shutil.move(path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return size, sha256

    def save_dir(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # shutil.move would put the source *inside* an existing folder
            self.delete(key)
        shutil.move(path, target)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@lru_cache
def get_storage() -> Storage:
    return LocalStorage(get_settings().artifacts_dir)


def work_root(settings: Settings | None = None) -> Path:
    """The local scratch folder: ``DISTILL_WORK_DIR``, or the artifacts folder when unset."""
    settings = settings or get_settings()
    return Path(settings.work_dir if settings.work_dir is not None else settings.artifacts_dir).resolve()


def work_dir_for(job_id: str, settings: Settings | None = None) -> Path:
    """Where a worker writes job ``job_id``'s checkpoints and outputs: ``<work root>/jobs/<job_id>``.
    With DISTILL_WORK_DIR unset that is ``<artifacts_dir>/jobs/<job_id>``, where jobs always ran,
    so a job interrupted across an upgrade still finds its checkpoints."""
    return work_root(settings) / storage_keys.job_folder(job_id)
