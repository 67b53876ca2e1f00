"""The live API's OpenAPI document: valid, every response body a named schema, errors documented
as problem+json with the schema the errors really have; /docs and /redoc load nothing from outside."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource

# Bodies that are not JSON objects: file downloads, Server-Sent Events, the model report.
NON_JSON = {"application/octet-stream", "application/gzip", "text/event-stream", "text/html"}
# OpenAI's error shape ({"error": {...}}), not RFC 9457, on the OpenAI-compatible routes (issue 10, item 3).
OPENAI_SHAPED = {"/v1/completions", "/v1/chat/completions"}
PROBLEM = "#/components/schemas/Problem"
PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def document(api_url) -> dict:
    response = httpx.get(f"{api_url}/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in {"get", "post", "put", "patch", "delete"}:
                yield path, method, operation


def schema_validator(document: dict, name: str) -> Draft202012Validator:
    """A JSON Schema validator for components/schemas/<name>, resolving the document's own $refs."""
    resource = Resource.from_contents({**document, "$schema": "https://json-schema.org/draft/2020-12/schema"})
    registry = Registry().with_resource("urn:openapi", resource)
    return Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{name}"}, registry=registry)


def test_the_document_validates(document):
    validate(document)  # openapi-spec-validator: raises on any violation of the OpenAPI specification
    assert document["openapi"].startswith("3.")


def test_every_success_body_is_a_named_schema(document):
    untyped = []
    for path, method, operation in operations(document):
        successes = {code: r for code, r in operation["responses"].items() if code.startswith("2")}
        assert successes, f"{method.upper()} {path} documents no 2xx response"
        for code, response in successes.items():
            content = response.get("content") or {}
            if not content:
                untyped.append(f"{method.upper()} {path} {code}: no content")
            for media, body in content.items():
                ref = (body.get("schema") or {}).get("$ref", "")
                if media in NON_JSON:
                    continue
                if not ref.startswith("#/components/schemas/"):
                    untyped.append(f"{method.upper()} {path} {code} {media}: {body.get('schema')}")
                else:
                    named = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
                    assert named.get("properties"), f"{ref} is a bare object"
    assert not untyped, "responses without a named schema:\n" + "\n".join(untyped)


def test_the_public_objects_have_named_parts(document):
    schemas = document["components"]["schemas"]
    job = schemas["JobPublic"]["properties"]
    assert job["spec"] == {"$ref": "#/components/schemas/JobSpecPublic"}
    assert job["progress"] == {"$ref": "#/components/schemas/JobProgress"}
    assert job["metrics"] == {"$ref": "#/components/schemas/JobMetrics"}
    assert schemas["ModelPublic"]["properties"]["evaluation"] == {"$ref": "#/components/schemas/Evaluation"}
    assert "teacher" in schemas["Evaluation"]["properties"] and "train_loss" in schemas["JobMetrics"]["properties"]


def _problem_response(operation: dict, status: str) -> dict | None:
    response = operation["responses"].get(status)
    return None if response is None else (response.get("content") or {}).get(PROBLEM_JSON)


def test_errors_are_documented_as_problem_json(document):
    missing = []
    for path, method, operation in operations(document):
        if not path.startswith("/v1/") or path in OPENAI_SHAPED:
            continue
        expected = {"401", "422"}
        if "{" in path:  # an id in the path: unknown ids are 404
            expected.add("404")
        if (method == "delete" and not path.startswith("/v1/webhooks")) or path.endswith("/cancel"):
            expected.add("409")  # in use / still running / already finished (a webhook endpoint can always go)
        if path == "/v1/files" and method == "post":
            expected |= {"409", "413"}  # Idempotency-Key in flight; over the upload limit or quota
        for status in sorted(expected):
            body = _problem_response(operation, status)
            if body is None or body.get("schema", {}).get("$ref") != PROBLEM:
                missing.append(f"{method.upper()} {path} {status}")
                continue
            example = body["example"]
            assert example["status"] == int(status) and example["title"] and example["code"], example
            schema_validator(document, "Problem").validate(example)
        assert "application/json" not in (operation["responses"].get("422", {}).get("content") or {}), \
            f"{method.upper()} {path}: 422 still documented as FastAPI's HTTPValidationError"
    assert not missing, "errors not documented as problem+json:\n" + "\n".join(missing)


def test_real_errors_match_the_documented_problem_schema(document, client, api_url):
    problem = schema_validator(document, "Problem")
    unknown = client.get("/models/model-000000000000000000000000")
    assert unknown.status_code == 404 and unknown.headers["content-type"] == PROBLEM_JSON
    problem.validate(unknown.json())
    invalid = client.post("/distillation/jobs", json={"task": "classification", "hyperparameters": {"epochs": 0}})
    assert invalid.status_code == 422
    problem.validate(invalid.json())
    assert invalid.json()["errors"]
    unauthorized = httpx.get(api_url + "/v1/models", timeout=30)
    assert unauthorized.status_code == 401
    problem.validate(unauthorized.json())


def test_a_job_validates_against_its_documented_schema(document, client, problem, tmp_path):
    """JobPublic (with JobSpecPublic, JobMetrics, JobProgress) describes what the API really returns."""
    from .helpers import job_body, submit, upload

    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    job = submit(client, job_body(teacher["id"], training["id"]))
    schema_validator(document, "JobPublic").validate(job)
    assert job["spec"]["training_file"] == training["id"]  # the spec as stored, not reshaped
    assert job["metrics"] == {}  # nothing added while queued: declared fields a stored object lacks stay out
    client.post(f"/distillation/jobs/{job['id']}/cancel")


# Every URL a docs page names: src= / href= / ReDoc's spec-url= attributes, Swagger UI's `url: '...'`.
ASSET = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl\s*:\s*['"]([^'"]+)['"]""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(api_url, page):
    response = httpx.get(api_url + page, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "://" not in html, "the page names an absolute (external) URL"
    urls = {u for groups in ASSET.findall(html) for u in groups if u}
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts, f"no script found in {page}"
    assert "/openapi.json" in urls or "/openapi.json" in html
    for url in urls:
        asset = httpx.get(urljoin(api_url + page, url), timeout=30)
        assert asset.status_code == 200, (url, asset.status_code)
        kind = asset.headers["content-type"]
        if url.endswith(".js"):
            assert "javascript" in kind and len(asset.content) > 100_000  # the real bundle, not a stub
        elif url.endswith(".css"):
            assert kind.startswith("text/css")


def test_responses_conform_to_the_document(api_url, api_key, client, workers, problem, tmp_path):
    """Schemathesis over every operation with the conformance checks: every status code, content
    type and body the API answers is the one the document declares (lists hold a real finished
    job and model, so their item schemas are checked against real objects)."""
    from .helpers import job_body, submit, upload, wait_for

    teacher, training = upload(client, problem.teacher, "model"), upload(client, problem.train_csv, "dataset")
    assert wait_for(client, submit(client, job_body(teacher["id"], training["id"], epochs=1))["id"])["status"] \
        == "succeeded"
    command = [str(Path(sys.executable).parent / "st"), "run", f"{api_url}/openapi.json", "--checks",
               "response_schema_conformance,content_type_conformance,status_code_conformance",
               "--max-examples", "6", "--generation-deterministic", "--no-color",
               "--header", f"Authorization: Bearer {api_key}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    failing = re.findall(r"^_+ ([A-Z]+ \S+) _+$", result.stdout, re.M)
    assert result.returncode == 0, f"operations answering what the document does not say: {failing}\n" + \
        result.stdout[-6000:]
