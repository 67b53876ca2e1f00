"""Safe extraction of uploaded model archives, and deterministic packing."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from distill.archive import detect_archive_format, extract_archive, make_archive
from distill.errors import ArchiveError, ModelFormatError

MB = 1 << 20


def _model_dir(root: Path) -> Path:
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "gpt2"}')
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (src / "sub" / "notes.txt").write_text("hello")
    return src


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return path


def _refused(archive: Path, dest: Path, fragment: str, **limits) -> ArchiveError:
    with pytest.raises(ArchiveError) as caught:
        extract_archive(archive, dest, max_total_bytes=limits.get("max_total_bytes", 10 * MB),
                        max_members=limits.get("max_members", 10_000))
    assert fragment in caught.value.message, caught.value.message
    assert caught.value.code == "invalid_archive"
    assert isinstance(caught.value, ModelFormatError)
    assert not dest.exists() or not any(p.is_file() for p in dest.rglob("*")), "a refused archive left files behind"
    return caught.value


def test_round_trip_single_top_folder_and_deterministic(tmp_path):
    src = _model_dir(tmp_path)
    archive = make_archive(src, tmp_path / "out" / "model-abc.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == "model-abc" and all(n == "model-abc" or n.startswith("model-abc/") for n in names)
    assert names == sorted(names, key=lambda n: n.split("/"))
    model_dir = extract_archive(archive, tmp_path / "x", max_total_bytes=MB)
    assert model_dir == tmp_path / "x" / "model-abc"
    assert _files(model_dir) == _files(src)
    again = make_archive(src, tmp_path / "other" / "model-abc.tar.gz")
    assert again.read_bytes() == archive.read_bytes()  # byte-for-byte deterministic


def test_format_detected_by_content_not_suffix(tmp_path):
    src = _model_dir(tmp_path)
    archive = make_archive(src, tmp_path / "m.tgz")
    disguised = tmp_path / "upload.zip"
    disguised.write_bytes(archive.read_bytes())
    assert detect_archive_format(disguised) == "tar.gz"
    assert _files(extract_archive(disguised, tmp_path / "x", max_total_bytes=MB)) == _files(src)
    plain = _tar(tmp_path / "plain.bin", [("a.txt", b"1"), ("b/c.txt", b"2")], mode="w")
    assert detect_archive_format(plain) == "tar"
    assert extract_archive(plain, tmp_path / "y", max_total_bytes=MB) == tmp_path / "y"  # two top-level entries
    zipped = _zip(tmp_path / "z.tar.gz", [("m/config.json", b"{}"), ("m/model.safetensors", b"x")])
    assert detect_archive_format(zipped) == "zip"
    assert extract_archive(zipped, tmp_path / "z", max_total_bytes=MB) == tmp_path / "z" / "m"
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not an archive at all" * 30)
    _refused(junk, tmp_path / "j", "not a .tar.gz")


def test_traversal_entry_refused(tmp_path):
    archive = _tar(tmp_path / "a.tar.gz", [("m/ok.txt", b"ok"), ("../x", b"evil")])
    _refused(archive, tmp_path / "dest", "'../x'")
    assert not (tmp_path / "x").exists()


def test_absolute_path_refused(tmp_path):
    archive = _tar(tmp_path / "a.tar.gz", [("/tmp/evil.txt", b"evil")])
    _refused(archive, tmp_path / "dest", "'/tmp/evil.txt'")


@pytest.mark.parametrize("link_type, fragment", [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"),
                                                 (tarfile.FIFOTYPE, "fifo"), (tarfile.CHRTYPE, "device")])
def test_links_and_special_files_refused(tmp_path, link_type, fragment):
    link = tarfile.TarInfo("m/link")
    link.type = link_type
    link.linkname = "/etc/passwd"
    archive = _tar(tmp_path / "a.tar", [("m/config.json", b"{}"), link], mode="w")
    error = _refused(archive, tmp_path / "dest", "'m/link'")
    assert fragment in error.message


@pytest.mark.parametrize("name", ["m/../../x", "..\\x", "m\\..\\..\\x", "C:/x", "/abs"])
def test_zip_unsafe_paths_refused(tmp_path, name):
    archive = _zip(tmp_path / "a.zip", [("m/config.json", b"{}"), (name, b"evil")])
    _refused(archive, tmp_path / "dest", repr(name))
    assert not (tmp_path / "x").exists()


def test_zip_symlink_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("m/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    _refused(archive, tmp_path / "dest", "'m/link'")


def test_too_many_members_refused(tmp_path):
    entries = [(f"m/f{i}.txt", b"x") for i in range(5)]
    _refused(_tar(tmp_path / "a.tar.gz", entries), tmp_path / "d1", "more than 3 entries", max_members=3)
    _refused(_zip(tmp_path / "a.zip", entries), tmp_path / "d2", "'m/f3.txt'", max_members=3)
    assert extract_archive(_zip(tmp_path / "b.zip", entries), tmp_path / "d3", MB, max_members=5).name == "m"


def test_zip_bomb_refused_by_bytes_written(tmp_path):
    bomb = _zip(tmp_path / "bomb.zip", [("m/config.json", b"{}"), ("m/zeros.bin", bytes(4 * MB))])
    assert bomb.stat().st_size < 64 * 1024  # small compressed, large uncompressed
    _refused(bomb, tmp_path / "dest", "'m/zeros.bin'", max_total_bytes=MB)
    tar_bomb = _tar(tmp_path / "bomb.tar.gz", [("m/zeros.bin", bytes(4 * MB))])
    _refused(tar_bomb, tmp_path / "dest2", "more than 1048576 bytes", max_total_bytes=MB)


def test_zip_bomb_with_lying_header_counted_while_streaming(tmp_path, monkeypatch):
    """The declared sizes are only a first check: the bytes actually written are what counts."""
    bomb = _zip(tmp_path / "bomb.zip", [("m/a.bin", bytes(600 * 1024)), ("m/b.bin", bytes(600 * 1024))])
    import distill.archive as archive_module

    monkeypatch.setattr(archive_module._Extractor, "check_declared", lambda self, entries: None)  # headers lie
    original_file = archive_module._Extractor.file
    monkeypatch.setattr(archive_module._Extractor, "file",
                        lambda self, name, size, stream: original_file(self, name, 0, stream))  # header says 0 bytes
    _refused(bomb, tmp_path / "dest", "'m/b.bin'", max_total_bytes=MB)


def test_duplicate_entry_refused(tmp_path):
    archive = _tar(tmp_path / "a.tar", [("m/x.txt", b"1"), ("m/./x.txt", b"2")], mode="w")
    _refused(archive, tmp_path / "dest", "appears twice")


def test_macos_metadata_is_skipped(tmp_path):
    archive = _zip(tmp_path / "a.zip", [("m/config.json", b"{}"), ("__MACOSX/m/._config.json", b"junk")])
    model_dir = extract_archive(archive, tmp_path / "dest", max_total_bytes=MB)
    assert model_dir == tmp_path / "dest" / "m"
    assert not (tmp_path / "dest" / "__MACOSX").exists()


def _writes(monkeypatch) -> list[str]:
    """The entries extraction starts writing (calls to _Extractor.file), recorded."""
    import distill.archive as archive_module

    started: list[str] = []
    original_file = archive_module._Extractor.file

    def recording(self, name, size, stream):
        started.append(name)
        return original_file(self, name, size, stream)

    monkeypatch.setattr(archive_module._Extractor, "file", recording)
    return started


def test_zip_bomb_refused_by_declared_sizes_before_a_byte_is_written(tmp_path, monkeypatch):
    started = _writes(monkeypatch)
    entries = [("m/config.json", b"{}")] + [(f"m/zeros{i}.bin", bytes(MB)) for i in range(8)]  # 8 MiB, ~8 KiB packed
    error = _refused(_zip(tmp_path / "bomb.zip", entries), tmp_path / "dest", "declares", max_total_bytes=4 * MB)
    assert "'m/zeros3.bin'" in error.message  # 2 + 4 x 1 MiB: where the declared total crosses 4 MiB
    assert started == [], "extraction began before the declared sizes were checked"
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_tar_member_declaring_more_than_the_limit_is_refused_before_it_is_written(tmp_path):
    """A tar member's size is in its header: a member that would take the total past the limit is
    refused before its data is read (here there is none: the header promises 1 GiB, the file stops)."""
    info = tarfile.TarInfo("m/huge.bin")
    info.size = 1 << 30
    archive = tmp_path / "a.tar"
    small = tarfile.TarInfo("m/config.json")
    small.size = 2
    with open(archive, "wb") as out:
        out.write(small.tobuf() + b"{}".ljust(512, b"\0") + info.tobuf())
    error = _refused(archive, tmp_path / "dest", "declares", max_total_bytes=MB)
    assert "'m/huge.bin'" in error.message


def test_declared_sizes_within_the_limit_extract(tmp_path, monkeypatch):
    started = _writes(monkeypatch)
    entries = [("m/config.json", b"{}"), ("m/w.bin", bytes(MB))]
    assert extract_archive(_zip(tmp_path / "ok.zip", entries), tmp_path / "d", max_total_bytes=MB + 2).name == "m"
    assert started == ["m/config.json", "m/w.bin"]
