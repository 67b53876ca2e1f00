"""Artifact storage behind one small interface. Today a local folder shared by the API
and workers; an S3-compatible store for workers on other machines plugs in here,
with ``local_path`` becoming "download to a cache, return the path"."""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from .config import get_settings

__all__ = ["LocalStorage", "get_storage", "TooLarge", "file_sha256"]

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class TooLarge(Exception):
    """The stream went past the byte limit; nothing was kept."""


class LocalStorage:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def save_stream(self, key: str, source: BinaryIO, max_bytes: int) -> tuple[int, str]:
        """Copy ``source`` to ``key``, hashing on the way; returns (bytes, sha256 hex)."""
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

    def save_file(self, key: str, source: Path) -> tuple[int, str]:
        with open(source, "rb") as handle:
            return self.save_stream(key, handle, max_bytes=1 << 62)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@lru_cache
def get_storage() -> LocalStorage:
    return LocalStorage(get_settings().artifacts_dir)
