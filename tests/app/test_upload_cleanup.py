"""An upload keeps its bytes only if its row is committed: files.create_file in-process, against
the test PostgreSQL database and artifacts folder, through the failures HTTP cannot force (a bug
in validation, a rollback after the upload was stored)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.conftest import app_in_process


@pytest.fixture
def in_process(service_env, monkeypatch):
    """The app's settings, engine and storage pointed at the test service's database and folder."""
    with app_in_process(service_env, monkeypatch):
        yield Path(service_env["DISTILL_ARTIFACTS_DIR"])


def _folders(artifacts: Path) -> set[str]:
    return {p.name for p in (artifacts / "files").iterdir()} if (artifacts / "files").is_dir() else set()


def test_an_unexpected_error_in_validation_keeps_nothing(in_process, monkeypatch):
    from app.db import session_scope
    from app.services import files

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in a validator")

    monkeypatch.setattr(files, "_validate", bug)
    before = _folders(in_process)
    with pytest.raises(RuntimeError), session_scope() as session:
        files.create_file(session, "cleanup-test", io.BytesIO(b"a,b\n1,2\n"), "d.csv", "dataset")
    assert _folders(in_process) == before


def test_a_rolled_back_upload_takes_its_bytes_with_it(in_process):
    from app.db import session_scope
    from app.services import files

    before = _folders(in_process)
    with pytest.raises(LookupError), session_scope() as session:
        record = files.create_file(session, "cleanup-test", io.BytesIO(b"a,b\n1,2\n"), "d.csv", "dataset")
        assert (in_process / "files" / record.id).is_dir()
        raise LookupError("a later step of the request fails")  # session_scope rolls back
    assert _folders(in_process) == before


def test_a_committed_upload_survives_a_later_rollback(in_process):
    from sqlalchemy import text

    from app.db import session_scope
    from app.services import files

    with session_scope() as session:
        file_id = files.create_file(session, "cleanup-test", io.BytesIO(b"a,b\n1,2\n"), "d.csv", "dataset").id
        session.commit()
        session.execute(text("SELECT 1"))
        session.rollback()  # a later transaction of the same session fails: the committed file stays
    assert (in_process / "files" / file_id).is_dir()
    with session_scope() as session:
        files.delete_file(session, "cleanup-test", file_id)
    assert not (in_process / "files" / file_id).exists()
