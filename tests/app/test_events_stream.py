"""GET /v1/distillation/jobs/{id}/events?stream=true: Server-Sent Events over the event rows,
in order, resumable with Last-Event-ID, with keep-alive comments, ending after the final stage."""

from __future__ import annotations

import json

import httpx

from .helpers import events, job_body, submit, upload, wait_for
from .stack import Stack


def read_sse(client: httpx.Client, job_id: str, headers: dict | None = None, until_comment: bool = False):
    """(messages, comments) until the server ends the stream (or the first comment)."""
    messages, comments, current = [], [], {}
    with client.stream("GET", f"/distillation/jobs/{job_id}/events", params={"stream": "true"},
                       headers=headers or {}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
                if until_comment:
                    break
            elif line == "":
                if "data" in current:
                    messages.append(current)
                current = {}
            else:
                field, _, value = line.partition(": ")
                current[field] = value
    return messages, comments


def test_stream_delivers_every_event_in_order_and_resumes(client, workers, problem):
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    job = submit(client, job_body(teacher["id"], training["id"], epochs=4))

    messages, _ = read_sse(client, job["id"])  # live, from the start: ends by itself after the final stage
    listed = events(client, job["id"])
    assert [int(m["id"]) for m in messages] == [e["id"] for e in listed]  # every row, in order
    assert [m["event"] for m in messages] == [e["type"] for e in listed]
    assert [json.loads(m["data"]) for m in messages] == listed  # the same objects as the paged list
    assert json.loads(messages[-1]["data"])["data"]["stage"] == wait_for(client, job["id"])["status"] == "succeeded"

    resumed, _ = read_sse(client, job["id"], headers={"Last-Event-ID": messages[2]["id"]})
    assert [m["id"] for m in resumed] == [m["id"] for m in messages[3:]]


def test_stream_of_a_waiting_job_sends_keep_alives(service_env, tmp_path, problem):
    # A stack with no worker: the job stays queued, and the stream keeps the line open with comments.
    with Stack(service_env, tmp_path, DISTILL_SSE_KEEPALIVE_S="0.5") as stack:
        teacher = upload(stack.client, problem.teacher, "model")
        training = upload(stack.client, problem.train_csv, "dataset")
        job = submit(stack.client, job_body(teacher["id"], training["id"]))
        messages, comments = read_sse(stack.client, job["id"], until_comment=True)
        assert [json.loads(m["data"])["data"]["stage"] for m in messages] == ["queued"]
        assert comments == [": keep-alive"]
        assert stack.client.post(f"/distillation/jobs/{job['id']}/cancel").status_code == 200


def test_stream_of_an_unknown_job_is_a_404(client):
    response = client.get("/distillation/jobs/job-000000000000000000000000/events", params={"stream": "true"})
    assert response.status_code == 404 and response.json()["param"] == "job_id"
