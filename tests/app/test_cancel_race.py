"""Cancellation is final: of many jobs cancelled at random moments (queued, loading,
teacher inference, training, evaluating, exporting), every one whose cancel was answered
200 ends ``cancelled`` — never ``succeeded`` — and a 409 only ever answers a job that had
already finished."""

from __future__ import annotations

import random
import time

from .helpers import job_body, submit, upload, wait_for


def test_every_cancel_answered_200_ends_cancelled(client, workers, problem):
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    validation = upload(client, problem.val_csv, "dataset")
    rng = random.Random(7)
    answered = []
    for _ in range(12):
        job = submit(client, job_body(teacher["id"], training["id"], validation["id"], epochs=6))
        time.sleep(rng.uniform(0.0, 2.5))  # queued, loading, training or already done
        response = client.post(f"/distillation/jobs/{job['id']}/cancel")
        assert response.status_code in (200, 409), response.text
        answered.append((job["id"], response.status_code, response.json()))
    for job_id, status_code, body in answered:
        final = wait_for(client, job_id, timeout=240)
        if status_code == 200:
            assert body["status"] in ("running", "cancelled") and (body["status"] == "cancelled"
                                                                   or body["cancel_requested"])
            assert final["status"] == "cancelled", (job_id, final["status"])
            assert final["result_model_id"] is None
        else:
            assert body["code"] == "conflict" or "finished" in body["detail"]
            assert final["status"] in ("succeeded", "failed")
    assert any(code == 200 and body["status"] == "running" for _, code, body in answered)  # some mid-run
