"""Model archives: safe extraction of uploaded ``.tar.gz`` / ``.tgz`` / ``.tar`` / ``.zip`` files,
and deterministic ``.tar.gz`` packing of a model directory.

Extraction treats the archive as hostile. The format is detected from the content (the
suffix is not trusted). An entry is refused with :class:`~distill.errors.ArchiveError`
(naming the entry) when

- its path is absolute, has a drive letter, or has a ``..`` component (backslashes count
  as separators, so ``..\\x`` and ``C:\\x`` are caught too), or contains a NUL byte;
- it is anything but a regular file or a directory (symlink, hardlink, device, fifo);
- it appears twice, or a file and a directory share a path;
- the archive has more than ``max_members`` entries, or its files exceed ``max_total_bytes``
  unpacked. That is checked before anything is written where the format declares the sizes
  (a zip's central directory lists every entry's ``file_size``: their sum is checked before
  the first byte is written; a tar member's ``size`` before that member is written), and
  again while streaming, counting the bytes really decompressed (headers may lie).

macOS metadata (``__MACOSX/`` entries in zips made by Finder) is skipped. Files are written
with mode 0644 and directories 0755 whatever the archive says; owners are not restored.
On any error, what this call wrote is removed again.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from .errors import ArchiveError

__all__ = ["extract_archive", "make_archive", "detect_archive_format", "ARCHIVE_SUFFIXES"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_SKIPPED_TOP = "__MACOSX"


def detect_archive_format(path: Path) -> str:
    """``"zip"``, ``"tar.gz"`` or ``"tar"`` from the file's first bytes; ArchiveError otherwise."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        raise ArchiveError(f"cannot read the archive: {exc.strerror}") from None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head and tarfile.is_tarfile(path):  # old (v7) tar without the ustar magic
        return "tar"
    raise ArchiveError("the file is not a .tar.gz, .tgz, .tar or .zip archive")


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """The entry's path as clean components, or None for the archive root ("", "./").

    Raises ArchiveError for absolute paths, drive letters, ``..`` and NUL bytes."""
    if "\x00" in name:
        raise ArchiveError(f"archive entry {name!r} has a NUL byte in its name")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or _DRIVE.match(normalized):
        raise ArchiveError(f"archive entry {name!r} has an absolute path; entries must be relative")
    parts = tuple(p for p in normalized.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"archive entry {name!r} points outside the archive ('..' in its path)")
    if any(_DRIVE.match(p) for p in parts):  # "a/C:x" on Windows-minded tools; refuse, harmless to be strict
        raise ArchiveError(f"archive entry {name!r} has a drive letter in its path")
    return parts or None


class _Extractor:
    def __init__(self, dest: Path, max_total_bytes: int, max_members: int):
        self.dest = dest
        self.root = dest.resolve()
        self.max_total_bytes = max_total_bytes
        self.max_members = max_members
        self.members = 0
        self.total = 0
        self.files: set[tuple[str, ...]] = set()
        self.dirs: set[tuple[str, ...]] = set()
        self.created: list[Path] = []  # in creation order, for clean-up

    def count(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise ArchiveError(f"the archive has more than {self.max_members} entries (at entry {name!r})")

    def _target(self, name: str, parts: tuple[str, ...]) -> Path:
        target = self.dest.joinpath(*parts)
        resolved = target.resolve()
        if resolved != self.root and self.root not in resolved.parents:  # belt and braces
            raise ArchiveError(f"archive entry {name!r} points outside the archive")
        return target

    def _mkdirs(self, name: str, parts: tuple[str, ...]) -> None:
        for depth in range(1, len(parts) + 1):
            prefix = parts[:depth]
            if prefix in self.files:
                raise ArchiveError(f"archive entry {name!r} uses {'/'.join(prefix)!r} both as a file and a folder")
            if prefix in self.dirs:
                continue
            path = self._target(name, prefix)
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise ArchiveError(f"archive entry {name!r}: {'/'.join(prefix)!r} already exists and is not a folder")
            if not path.exists():
                path.mkdir(mode=0o755)
                self.created.append(path)
            self.dirs.add(prefix)

    def directory(self, name: str) -> None:
        parts = _safe_parts(name)
        if parts is not None:
            self._mkdirs(name, parts)

    def file(self, name: str, declared_size: int, stream: BinaryIO) -> None:
        parts = _safe_parts(name)
        if parts is None:
            raise ArchiveError(f"archive entry {name!r} is a file without a name")
        if parts in self.files or parts in self.dirs:
            raise ArchiveError(f"archive entry {name!r} appears twice in the archive")
        if self.total + max(declared_size, 0) > self.max_total_bytes:  # the header's size, before writing
            raise ArchiveError(self._too_big(name, declared=True))
        self._mkdirs(name, parts[:-1])
        target = self._target(name, parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(target, flags, 0o644)
        except FileExistsError:
            raise ArchiveError(f"archive entry {name!r}: the file already exists in the destination") from None
        self.files.add(parts)
        self.created.append(target)
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                self.total += len(chunk)
                if self.total > self.max_total_bytes:  # what was really decompressed, not what the header said
                    raise ArchiveError(self._too_big(name))
                out.write(chunk)

    def check_declared(self, entries: list[tuple[str, int]]) -> None:
        """Refuse before writing anything when the sizes the archive declares (name, bytes) add up past the limit."""
        declared = 0
        for name, size in entries:
            declared += max(size, 0)
            if declared > self.max_total_bytes:
                raise ArchiveError(self._too_big(name, declared=True))

    def _too_big(self, name: str, declared: bool = False) -> str:
        how = ", by the sizes the archive declares" if declared else ""
        return f"the archive unpacks to more than {self.max_total_bytes} bytes (limit reached at entry {name!r}{how})"

    def cleanup(self) -> None:
        for path in reversed(self.created):
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
            except OSError:
                pass

    def model_dir(self) -> Path:
        tops = {parts[0] for parts in self.files | self.dirs}
        nested = all(len(parts) > 1 for parts in self.files)
        if len(tops) == 1 and self.files and nested:
            return self.dest / next(iter(tops))
        return self.dest


def _extract_tar(archive: Path, extractor: _Extractor, compressed: bool) -> None:
    try:
        with tarfile.open(archive, mode="r:gz" if compressed else "r:") as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                tar.members = []  # iterate without keeping every header in memory
                name = member.name
                extractor.count(name)
                if _is_skipped(name):
                    continue
                if member.isdir():
                    extractor.directory(name)
                elif member.isreg():
                    stream = tar.extractfile(member)
                    if stream is None:  # pragma: no cover - isreg() members always have data
                        raise ArchiveError(f"archive entry {name!r} cannot be read")
                    extractor.file(name, member.size, stream)
                else:
                    raise ArchiveError(f"archive entry {name!r} is {_tar_kind(member)}; only regular files and folders "
                                       "are allowed")
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ArchiveError(f"the archive is corrupt or truncated: {exc}") from None


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a named pipe (fifo)"
    return f"an entry of unsupported type {member.type!r}"


def _extract_zip(archive: Path, extractor: _Extractor) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > extractor.max_members:
                raise ArchiveError(f"the archive has {len(infos)} entries, more than {extractor.max_members} "
                                   f"(entry {infos[extractor.max_members].filename!r} is over the limit)")
            # a zip bomb is refused from the central directory, before a byte is written
            extractor.check_declared([(i.filename, i.file_size) for i in infos if not _is_skipped(i.filename)])
            for info in infos:
                name = info.filename
                extractor.count(name)
                if _is_skipped(name):
                    continue
                mode = info.external_attr >> 16
                kind = stat.S_IFMT(mode)
                if kind == stat.S_IFLNK:
                    raise ArchiveError(f"archive entry {name!r} is a symbolic link; only regular files and folders "
                                       "are allowed")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise ArchiveError(f"archive entry {name!r} is a special file; only regular files and folders "
                                       "are allowed")
                if info.is_dir():
                    extractor.directory(name)
                    continue
                if info.flag_bits & 0x1:
                    raise ArchiveError(f"archive entry {name!r} is encrypted")
                with zf.open(info) as stream:
                    extractor.file(name, info.file_size, stream)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError,
            zlib.error) as exc:
        raise ArchiveError(f"the archive is corrupt or unsupported: {exc}") from None


def _is_skipped(name: str) -> bool:
    first = name.replace("\\", "/").lstrip("/").split("/", 1)[0]
    return first == _SKIPPED_TOP


def extract_archive(archive: Path, dest: Path, max_total_bytes: int, max_members: int = 10_000) -> Path:
    """Extract ``archive`` into ``dest`` (created if missing) and return the model directory.

    The model directory is the single top-level folder when every file sits under one, else
    ``dest`` itself. Raises ArchiveError naming the offending entry (see the module docstring);
    on error the files this call wrote are removed.
    """
    archive, dest = Path(archive), Path(dest)
    kind = detect_archive_format(archive)
    dest.mkdir(parents=True, exist_ok=True)
    extractor = _Extractor(dest, max_total_bytes, max_members)
    try:
        if kind == "zip":
            _extract_zip(archive, extractor)
        else:
            _extract_tar(archive, extractor, compressed=kind == "tar.gz")
        if not extractor.files:
            raise ArchiveError("the archive contains no files")
    except BaseException:
        extractor.cleanup()
        raise
    return extractor.model_dir()


def _archive_stem(dest: Path) -> str:
    name = dest.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return dest.stem


def _walk(src_dir: Path) -> Iterator[tuple[Path, PurePosixPath]]:
    """(path, relative path) of every folder and file under src_dir, sorted, folders before their contents."""
    for path in sorted(src_dir.rglob("*"), key=lambda p: p.relative_to(src_dir).parts):
        if path.is_symlink():
            raise ArchiveError(f"{path.relative_to(src_dir)} is a symbolic link; it is not packed")
        yield path, PurePosixPath(*path.relative_to(src_dir).parts)


def make_archive(src_dir: Path, dest: Path) -> Path:
    """Pack ``src_dir`` as a ``.tar.gz`` at ``dest`` with one top-level folder named after
    dest's stem (``model-abc.tar.gz`` -> ``model-abc/...``).

    The output is byte-for-byte deterministic: entries sorted by path, mtimes 0, owner root,
    modes 0644/0755, gzip header without a timestamp. Written to a temporary file and renamed.
    """
    src_dir, dest = Path(src_dir), Path(dest)
    if not src_dir.is_dir():
        raise ArchiveError(f"{src_dir} is not a directory")
    top = _archive_stem(dest)
    if not top or top in (".", ".."):
        raise ArchiveError(f"cannot derive a folder name from {dest.name!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")

    def info(name: str, is_dir: bool, size: int = 0) -> tarfile.TarInfo:
        entry = tarfile.TarInfo(name)
        entry.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        entry.mode = 0o755 if is_dir else 0o644
        entry.size = size
        entry.mtime = 0
        entry.uid = entry.gid = 0
        entry.uname = entry.gname = ""
        return entry

    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(info(top, True))
            for path, rel in _walk(src_dir):
                name = f"{top}/{rel}"
                if path.is_dir():
                    tar.addfile(info(name, True))
                elif path.is_file():
                    with open(path, "rb") as handle:
                        tar.addfile(info(name, False, os.fstat(handle.fileno()).st_size), handle)
                else:
                    raise ArchiveError(f"{rel} is not a regular file; it is not packed")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
