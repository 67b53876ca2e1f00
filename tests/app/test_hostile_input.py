"""Hostile input over the real API: every answer is a 4xx problem+json naming the field (and the
line, for dataset lines), never a 5xx; a refused upload leaves nothing in the artifacts folder;
the service still answers /healthz afterwards.

The corpus holds the classes that once answered 500 (schemathesis and a hostile-upload run): a
CSV field over the csv module's 131,072-character limit, a bare CR in a CSV field, JSON nested
100,000 deep (a JSONL line, an archive's config.json, a model file's architecture), a
5000-digit integer, a NUL byte in an id or cursor, an empty or malformed file id; and beside
them the ones that always were 4xx (pickles, '..' and symlink entries, a lying safetensors
header, an empty file, a wrong purpose), so none regresses.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import UPLOAD_LIMIT

from .helpers import job_body, upload, upload_bytes

DEEP = 100_000  # nesting levels: far past Python's recursion limit (1000)
BIG_INT = "1" * 5000  # past int()'s 4300-digit conversion limit


def problem_4xx(response, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == response.status_code and body["detail"] and body["param"], body
    assert len(response.content) < 20_000, "the problem echoes the hostile input back"
    return body


@pytest.fixture
def artifacts(service_env) -> Path:
    return Path(service_env["DISTILL_ARTIFACTS_DIR"])


def _leftovers(artifacts: Path) -> set[str]:
    """What uploads leave: the folders under files/ and the archive scratch under tmp/."""
    return {str(p.relative_to(artifacts)) for sub in ("files", "tmp") if (artifacts / sub).is_dir()
            for p in (artifacts / sub).iterdir()}


def _tar(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buffer.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _zip_bomb(unpacked_bytes: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/config.json", '{"model_type": "gpt2"}')
        with zf.open("model/zeros.safetensors", "w", force_zip64=True) as out:
            chunk = bytes(1 << 20)
            for _ in range(unpacked_bytes >> 20):
                out.write(chunk)
    return buffer.getvalue()


def _safetensors_with_metadata(tmp_path: Path, architecture_json: str) -> bytes:
    path = tmp_path / "m.safetensors"
    save_file({"layers.0.weight": torch.zeros(2, 3), "layers.0.bias": torch.zeros(2)}, str(path),
              metadata={"distill_architecture": architecture_json})
    return path.read_bytes()


def _lying_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 16  # 4 MB promised, 16 bytes given


def _wide_csv(columns: int) -> bytes:
    return (",".join(f"c{i}" for i in range(columns)) + "\n" + ",".join("0" for _ in range(columns)) + "\n").encode()


# (name, content, filename, purpose, expected param, expected line or None, fragment of the detail)
UPLOADS = [
    ("csv header field over 131072 characters", b"a" * 140_000 + b",label\n1,0\n", "d.csv", "dataset",
     "file", 1, "longer than 131072"),
    ("csv body field over 131072 characters", b"a,label\n" + b"1" * 140_000 + b",0\n", "d.csv", "dataset",
     "file", 2, "longer than 131072"),
    ("bare CR in a csv field", b"a,b\n1,2\r3\n4,5\n", "d.csv", "dataset", "file", 2, "carriage return"),
    ("bare CR in the csv header", b"a\rb,c\n1,2\n", "d.csv", "dataset", "file", 1, "carriage return"),
    ("100000 csv columns", _wide_csv(100_000), "wide.csv", "dataset", "file", 1, "columns"),
    ("deeply nested features", b'{"features": ' + b"[" * DEEP + b"]" * DEEP + b"}\n", "d.jsonl", "dataset",
     "file", 1, "nested deeper"),
    ("deeply nested text record", b'{"text": "a"}\n{"text": "b", "meta": ' + b"[" * DEEP + b"]" * DEEP + b"}\n",
     "d.jsonl", "dataset", "file", 2, "nested deeper"),
    ("5000-digit feature", b'{"features": [' + BIG_INT.encode() + b"]}\n", "d.jsonl", "dataset", "file", 1,
     "4300 digits"),
    ("5000-digit text label", b'{"text": "a", "label": 0}\n{"text": "b", "label": ' + BIG_INT.encode() + b"}\n",
     "d.jsonl", "dataset", "file", 2, "4300 digits"),
    ("5000-digit csv label", b"a,label\n1," + BIG_INT.encode() + b"\n", "d.csv", "dataset", "file", 2, "label"),
    ("not UTF-8", b"a,b\n\xff\xfe,1\n", "d.csv", "dataset", "file", None, "UTF-8"),
    ("empty dataset", b"", "d.csv", "dataset", "file", None, "empty"),
    ("empty model", b"", "m.safetensors", "model", "file", None, "empty"),
    ("pickled model", b"\x80\x04\x95garbage", "model.safetensors", "model", "file", None, "pickled"),
    ("pickle by suffix", b"PK-not-really", "model.pt", "model", "file", None, "pickled"),
    ("lying safetensors header", _lying_safetensors(), "m.safetensors", "model", "file", None, "safetensors"),
    ("archive with '..'", _tar([("model/config.json", b"{}"), ("../evil", b"x")]), "m.tar.gz", "model", "file",
     None, "'../evil'"),
    ("archive with a symlink", _tar([("model/config.json", b"{}"), _symlink("model/w", "/etc/passwd")]),
     "m.tar.gz", "model", "file", None, "symbolic link"),
    ("archive config.json nested 100000 deep",
     _tar([("model/config.json", b'{"model_type": "gpt2", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}")]),
     "m.tar.gz", "model", "file", None, "config.json"),
    ("archive config.json with a 5000-digit integer",
     _tar([("model/config.json", b'{"model_type": "gpt2", "n_embd": ' + BIG_INT.encode() + b"}")]),
     "m.tar.gz", "model", "file", None, "config.json"),
    ("archive tokenizer_config.json nested 100000 deep",
     _tar([("model/config.json", b'{"model_type": "gpt2"}'),
           ("model/tokenizer_config.json", b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}")]),
     "m.tar.gz", "model", "file", None, "tokenizer_config.json"),
    ("zip bomb", _zip_bomb(64 << 20), "m.zip", "model", "file", None, "declare"),
]


@pytest.mark.parametrize("name, content, filename, purpose, param, line, fragment", UPLOADS,
                         ids=[u[0] for u in UPLOADS])
def test_hostile_upload_is_a_4xx_that_keeps_nothing(client, artifacts, name, content, filename, purpose, param,
                                                      line, fragment):
    assert len(content) < UPLOAD_LIMIT, "the case must reach validation, not the size limit"
    before = _leftovers(artifacts)
    body = problem_4xx(upload_bytes(client, content, filename, purpose), 422)
    assert body["param"] == param and fragment in body["detail"], body
    if line is not None:
        assert body["line"] == line and f"line {line}" in body["detail"], body
    assert _leftovers(artifacts) == before, "a refused upload left files behind"


def test_hostile_model_file_metadata(client, artifacts, tmp_path):
    before = _leftovers(artifacts)
    deep = _safetensors_with_metadata(tmp_path, "[" * DEEP + "]" * DEEP)
    assert "nested deeper" in problem_4xx(upload_bytes(client, deep, "m.safetensors", "model"), 422)["detail"]
    big = _safetensors_with_metadata(tmp_path, '{"input_dim": ' + BIG_INT + "}")
    assert "4300 digits" in problem_4xx(upload_bytes(client, big, "m.safetensors", "model"), 422)["detail"]
    listed = _safetensors_with_metadata(tmp_path, json.dumps(
        {"kind": "mlp", "input_dim": 3, "hidden_dims": [], "num_classes": 2, "activation": ["relu"]}))
    assert "activation" in problem_4xx(upload_bytes(client, listed, "m.safetensors", "model"), 422)["detail"]
    assert _leftovers(artifacts) == before


def test_wrong_purpose_is_422(client, artifacts):
    before = _leftovers(artifacts)
    assert problem_4xx(upload_bytes(client, b"a\n1\n", "d.csv", "weights"), 422)["param"] == "purpose"
    assert problem_4xx(upload_bytes(client, b"a\n1\n", "d.csv", "data\x00set"), 422)["param"] == "purpose"
    assert _leftovers(artifacts) == before


def _multipart(filename: bytes, content: bytes, purpose: bytes = b"dataset") -> tuple[bytes, dict]:
    """A form built by hand: httpx percent-escapes a NUL in a filename, a hostile client need not."""
    boundary = b"hostile-boundary"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b"\r\n"
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
            b"Content-Type: text/csv\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n")
    return body, {"Content-Type": "multipart/form-data; boundary=" + boundary.decode()}


def test_filename_with_control_characters_is_cleaned(client):
    body, headers = _multipart(b"bad\x00na\x1bme\x7f.csv", b"a,b\n1,2\n")
    response = client.post("/files", content=body, headers=headers)
    assert response.status_code == 201, response.text  # was a 500: PostgreSQL refuses NUL in a string
    assert response.json()["filename"] == "badname.csv"
    assert client.delete(f"/files/{response.json()['id']}").status_code == 200


def test_chunked_upload_over_the_limit_is_413(client):
    """No Content-Length: the body is counted as it streams, and the answer is 413 (it was 400)."""
    boundary = "hostile-boundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\ndataset\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.csv\"\r\n"
               "Content-Type: text/csv\r\n\r\n").encode()
        chunk = b"0" * 65536
        for _ in range((UPLOAD_LIMIT + 512 * 1024) // len(chunk)):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/files", content=body(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert problem_4xx(response, 413)["code"] == "payload_too_large"


ID_PATHS = [("GET", "/files/{}", "file_id"), ("GET", "/files/{}/content", "file_id"),
            ("DELETE", "/files/{}", "file_id"), ("GET", "/distillation/jobs/{}", "job_id"),
            ("POST", "/distillation/jobs/{}/cancel", "job_id"), ("GET", "/distillation/jobs/{}/events", "job_id"),
            ("DELETE", "/distillation/jobs/{}", "job_id"), ("GET", "/models/{}", "model_id"),
            ("GET", "/models/{}/download", "model_id"), ("DELETE", "/models/{}", "model_id")]


@pytest.mark.parametrize("raw_id", ["%00", "file-%00", "a%0Ab", "x" * 65, "a%20b", "%E2%80%A8"],
                         ids=["nul", "embedded-nul", "newline", "too-long", "space", "u2028"])
def test_malformed_ids_in_paths_are_refused_before_any_query(client, raw_id):
    for method, template, param in ID_PATHS:
        response = client.request(method, template.format(raw_id))
        body = problem_4xx(response)
        assert response.status_code in (404, 422), (method, template, response.status_code)
        if response.status_code == 422:
            assert body["param"] == param, (method, template, body)
    body = problem_4xx(client.post(f"/models/{raw_id}/predict", json={"inputs": [[1.0]]}))
    assert body["param"] in ("model_id", "inputs")


@pytest.mark.parametrize("path", ["/files", "/models", "/distillation/jobs"])
@pytest.mark.parametrize("cursor", ["\x00", "file-\x00", "x" * 65, "nope"])
def test_malformed_cursor_is_422(client, path, cursor):
    assert problem_4xx(client.get(path, params={"after": cursor}), 422)["param"] == "after"


@pytest.fixture(scope="module")
def uploaded(api_url, api_key, problem):
    import httpx

    from tests.conftest import bearer

    with httpx.Client(base_url=api_url + "/v1", timeout=60, headers=bearer(api_key)) as http:
        return {"teacher": upload(http, problem.teacher, "model"),
                "training": upload(http, problem.train_csv, "dataset")}


@pytest.mark.parametrize("change, param", [
    (lambda b: b.update(teacher={"file_id": ""}), "teacher.file_id"),
    (lambda b: b.update(teacher={"model_id": ""}), "teacher.model_id"),
    (lambda b: b.update(teacher={"path": ""}), "teacher.path"),
    (lambda b: b.update(teacher={"file_id": "\x00"}), "teacher.file_id"),
    (lambda b: b.update(teacher={"file_id": "file-" + "a" * 100}), "teacher.file_id"),
    (lambda b: b.update(teacher={"model_id": "model\x00"}), "teacher.model_id"),
    (lambda b: b.update(teacher={"path": "teacher\x00.safetensors"}), "teacher.path"),
    (lambda b: b.update(training_file=""), "training_file"),
    (lambda b: b.update(training_file="\x00"), "training_file"),
    (lambda b: b.update(validation_file=""), "validation_file"),
    (lambda b: b.update(validation_file="file-\x00"), "validation_file"),
    (lambda b: b.update(student={"file_id": ""}), "student.file_id"),
    (lambda b: b.update(student={"model_id": "\x00"}), "student.model_id"),
], ids=["empty-teacher-file", "empty-teacher-model", "empty-teacher-path", "nul-teacher-file", "long-teacher-file",
        "nul-teacher-model", "nul-teacher-path", "empty-training", "nul-training", "empty-validation",
        "nul-validation", "empty-student-file", "nul-student-model"])
def test_empty_or_malformed_ids_in_a_job_are_422(client, uploaded, change, param):
    body = job_body(uploaded["teacher"]["id"], uploaded["training"]["id"])
    change(body)
    assert problem_4xx(client.post("/distillation/jobs", json=body), 422)["param"] == param


@pytest.mark.parametrize("after", ["9" * 40, "-" + "9" * 40, "1e999", "\x00"])
def test_events_cursor_beyond_any_integer_is_no_5xx(client, uploaded, after):
    job = client.post("/distillation/jobs", json=job_body(uploaded["teacher"]["id"], uploaded["training"]["id"]))
    assert job.status_code == 201, job.text
    response = client.get(f"/distillation/jobs/{job.json()['id']}/events", params={"after": after})
    if response.status_code != 200:
        assert problem_4xx(response)["param"] == "after"
    client.post(f"/distillation/jobs/{job.json()['id']}/cancel")


@pytest.mark.parametrize("model", ["\x00", "model-\x00", "x" * 5000])
def test_malformed_model_in_completions_is_4xx(client, model):
    for path, extra in (("/completions", {"prompt": "hi"}),
                        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        assert problem_4xx(client.post(path, json={"model": model, **extra}), 404)["param"] == "model"


def test_the_service_still_answers_afterwards(api_url, client):
    import httpx

    assert httpx.get(api_url + "/healthz", timeout=10).json() == {"status": "ok"}
    assert client.get("/files", params={"limit": 1}).status_code == 200


def test_nul_inside_json_values_is_stored_not_a_500(client, uploaded):
    """A NUL inside a JSON value travels escaped (\\u0000) into PostgreSQL's json columns: not an error."""
    body = job_body(uploaded["teacher"]["id"], uploaded["training"]["id"])
    body["metadata"] = {"note\x00": "a\x00b"}
    job = client.post("/distillation/jobs", json=body)
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["metadata"] == {"note\x00": "a\x00b"}
    client.post(f"/distillation/jobs/{job.json()['id']}/cancel")


def test_extracted_limit_is_proportionate_to_the_upload_limit():
    from app.config import Settings

    assert Settings.model_fields["max_extracted_bytes"].default is None  # was a flat 8 GiB
    assert Settings(max_upload_bytes=1000, max_extracted_bytes=None).extracted_bytes_limit == 4000
    assert Settings(max_upload_bytes=1000, max_extracted_bytes=1500).extracted_bytes_limit == 1500


@pytest.mark.parametrize("path", ["/distillation/jobs", "/models/model-x/predict", "/completions"])
@pytest.mark.parametrize("body, status, fragment", [
    ('{"metadata": {"a": ' + "[" * DEEP + "]" * DEEP + "}}", 422, "nested too deeply"),
    ('{"hyperparameters": {"epochs": ' + BIG_INT + "}}", 422, "4300 digits"),
    ("{not json", 422, "JSON"),
], ids=["deep", "big-int", "invalid"])
def test_hostile_json_request_bodies_name_the_body(client, path, body, status, fragment):
    """Once 400 "There was an error parsing the body" with no param (deep, big-int)."""
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    problem = problem_4xx(response, status)
    assert problem["param"] == "body" and fragment in (problem["detail"] + str(problem.get("errors"))), problem


def test_malformed_multipart_names_the_body(client):
    response = client.post("/files", content=b"--x\r\nnot a form", headers={"content-type": "multipart/form-data"})
    assert problem_4xx(response)["param"] in ("body", "file")
