"""LocalStorage against a real folder, and the one module that spells storage keys."""

from __future__ import annotations

import hashlib
import io

import pytest

from app import storage_keys
from app.config import Settings
from app.storage import LocalStorage, Storage, TooLarge, file_sha256, work_dir_for, work_root


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "artifacts")


def test_local_storage_is_a_storage(storage):
    assert isinstance(storage, Storage)


def test_keys_keep_the_layout_existing_data_is_stored_under():
    assert storage_keys.file_folder("file-ab12") == "files/file-ab12"
    assert storage_keys.file_content("file-ab12", ".csv") == "files/file-ab12/content.csv"
    assert storage_keys.file_content("file-ab12", ".tar.gz") == "files/file-ab12/content.tar.gz"
    assert storage_keys.file_content("file-ab12", "") == "files/file-ab12/content"
    assert storage_keys.file_model_dir("file-ab12") == "files/file-ab12/model"
    assert storage_keys.generated_file("file-ab12") == "files/file-ab12/content.jsonl"
    assert storage_keys.model_folder("model-cd34") == "models/model-cd34"
    assert storage_keys.model_file("model-cd34") == "models/model-cd34/model.safetensors"
    assert storage_keys.model_dir("model-cd34") == "models/model-cd34/model"
    assert storage_keys.model_archive("model-cd34") == "models/model-cd34/model-cd34.tar.gz"
    assert storage_keys.job_folder("job-ef56") == "jobs/job-ef56"


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../file-1", "file 1", ".hidden", None])
def test_keys_refuse_ids_that_would_leave_their_folder(bad):
    with pytest.raises(ValueError):
        storage_keys.file_folder(bad)
    with pytest.raises(ValueError):
        storage_keys.job_folder(bad)


@pytest.mark.parametrize("bad", ["csv", "./x", "/etc", ".a.b.c", ".CSV"])
def test_file_content_refuses_odd_suffixes(bad):
    with pytest.raises(ValueError):
        storage_keys.file_content("file-1", bad)


def test_save_stream_hashes_and_round_trips(storage):
    payload = b"x" * 3_000_000  # several chunks
    size, sha256 = storage.save_stream("files/f/content.bin", io.BytesIO(payload), max_bytes=len(payload))
    assert (size, sha256) == (len(payload), hashlib.sha256(payload).hexdigest())
    assert storage.exists("files/f/content.bin")
    with storage.open("files/f/content.bin") as handle:
        assert handle.read() == payload
    assert file_sha256(storage.local_path("files/f/content.bin")) == sha256


def test_save_stream_past_the_limit_keeps_nothing(storage):
    with pytest.raises(TooLarge):
        storage.save_stream("files/f/content", io.BytesIO(b"12345"), max_bytes=4)
    assert not storage.exists("files/f/content")
    assert list(storage.local_path("files/f").iterdir()) == []  # no .part left behind


def test_save_file_copies_or_moves(storage, tmp_path):
    source = tmp_path / "student.safetensors"
    source.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert storage.save_file("models/m/model.safetensors", source) == (7, digest)
    assert source.exists()
    assert storage.save_file("models/m/copy.safetensors", source, move=True) == (7, digest)
    assert not source.exists()
    assert storage.local_path("models/m/copy.safetensors").read_bytes() == b"weights"


def test_save_dir_moves_the_folder_in_and_replaces_an_old_one(storage, tmp_path):
    final = tmp_path / "work" / "final"
    (final / "sub").mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "sub" / "a.txt").write_text("a")
    storage.local_path("models/m/model/stale.txt").parent.mkdir(parents=True)
    storage.local_path("models/m/model/stale.txt").write_text("old")
    storage.save_dir("models/m/model", final)
    stored = storage.local_path("models/m/model")
    assert not final.exists()
    assert sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*")) == ["config.json", "sub", "sub/a.txt"]


def test_delete_removes_a_file_or_a_folder_and_ignores_absent_keys(storage):
    storage.save_stream("files/f/content.csv", io.BytesIO(b"a,b\n"), max_bytes=100)
    storage.save_stream("files/f/model/config.json", io.BytesIO(b"{}"), max_bytes=100)
    storage.delete("files/f/content.csv")
    assert not storage.exists("files/f/content.csv") and storage.exists("files/f/model/config.json")
    storage.delete("files/f")
    assert not storage.exists("files/f")
    storage.delete("files/f")  # absent: no error


@pytest.mark.parametrize("key", ["../outside", "files/../../outside", "/etc/passwd", "", "."])
def test_keys_cannot_escape_the_root(storage, key):
    with pytest.raises(ValueError):
        storage.local_path(key)


def test_work_dir_defaults_to_where_jobs_always_ran(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_WORK_DIR", raising=False)
    settings = Settings(artifacts_dir=tmp_path / "artifacts")
    assert work_root(settings) == (tmp_path / "artifacts").resolve()
    assert work_dir_for("job-1", settings) == LocalStorage(tmp_path / "artifacts").local_path("jobs/job-1")


def test_work_dir_setting_moves_job_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_WORK_DIR", str(tmp_path / "scratch"))
    settings = Settings(artifacts_dir=tmp_path / "artifacts")
    assert work_dir_for("job-1", settings) == (tmp_path / "scratch" / "jobs" / "job-1").resolve()
