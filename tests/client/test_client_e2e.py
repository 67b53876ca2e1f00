"""The client and the CLI against the live stack (API, PostgreSQL, Redis, real Celery workers):
a tiny MLP job uploaded, run, streamed, downloaded and tried, through the library and the command."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from distill_client import AsyncDistill, Distill, NotFoundError, UnprocessableError

from ..app.helpers import events as listed_events
from ..app.helpers import job_body
from .conftest import client_env

UNKNOWN_JOB = "job-000000000000000000000000"


@pytest.fixture
def sdk(api_url, api_key):
    with Distill(api_key=api_key, base_url=api_url) as client:
        yield client


def test_sync_client_runs_a_job_end_to_end(sdk, client, workers, problem, tmp_path):
    teacher = sdk.files.create(file=problem.teacher, purpose="model")  # a path
    training = sdk.files.create(file=problem.train_csv.read_bytes(), filename="train.csv", purpose="dataset")
    with open(problem.val_csv, "rb") as handle:  # an open file
        validation = sdk.files.create(file=handle, purpose="dataset")
    assert (teacher.purpose, training.filename, validation.details["has_labels"]) == ("model", "train.csv", True)
    assert sdk.files.retrieve(training.id).sha256 == hashlib.sha256(problem.train_csv.read_bytes()).hexdigest()
    assert sdk.files.content(validation.id) == problem.val_csv.read_bytes()

    job = sdk.jobs.create(**job_body(teacher.id, training.id, validation.id, epochs=4))
    assert job.status in ("queued", "running") and job.spec["hyperparameters"]["epochs"] == 4

    streamed = list(sdk.jobs.events(job.id, stream=True))  # live from the start; ends after the final stage
    assert [e.id for e in streamed] == sorted(e.id for e in streamed)
    assert streamed[-1].is_final and streamed[-1].data["stage"] == "succeeded"
    assert [e.model_dump(exclude_unset=False) for e in streamed] == \
        [e.model_dump() for e in sdk.jobs.events(job.id)]  # the same rows as the paged list
    assert [e.id for e in streamed] == [e["id"] for e in listed_events(client, job.id)]
    assert [e.data["epoch"] for e in streamed if e.type == "metrics"] == [1, 2, 3, 4]

    done = sdk.jobs.wait(job.id, timeout=60)
    assert done.status == "succeeded" and done.progress.step == done.progress.total_steps > 0
    model = sdk.models.retrieve(done.result_model_id)
    assert model.job_id == job.id and model.evaluation["student"]["accuracy"] > 0.5
    assert model.id in [m.id for m in sdk.models.list()]

    path = sdk.models.download(model.id, tmp_path)  # a folder: the server's filename
    assert path == tmp_path / f"{model.id}.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256 and path.stat().st_size == model.size_bytes
    assert not list(tmp_path.glob("*.part"))
    assert model.id in sdk.models.report(model.id)  # the printable HTML report

    rows = [[float(v) for v in row] for row in problem.val_x[:5].tolist()]
    prediction = sdk.models.predict(model.id, rows)
    assert prediction.model == model.id and len(prediction.predictions) == 5
    assert all(abs(sum(p.probabilities) - 1) < 1e-4 and p.label == max(range(len(p.probabilities)),
               key=p.probabilities.__getitem__) for p in prediction.predictions)


def test_async_client_lists_jobs_across_pages(api_url, api_key, client, problem):
    async def scenario():
        async with AsyncDistill(api_key=api_key, base_url=api_url) as sdk:
            teacher = await sdk.files.create(file=problem.teacher, purpose="model")
            training = await sdk.files.create(file=problem.train_csv, purpose="dataset")
            created = await asyncio.gather(*[sdk.jobs.create(job_body(teacher.id, training.id)) for _ in range(3)])
            for job in created:  # they need not run: cancelled while queued (or stopped at once)
                await sdk.jobs.cancel(job.id)
            first = await sdk.jobs.list(limit=2)
            walked = [job async for job in sdk.jobs.list(limit=2)]
            pages = [page async for page in first.iter_pages()]
            streamed = [e async for e in await sdk.jobs.events(created[0].id, stream=True)]
            listed = await sdk.jobs.events(created[0].id)
            return created, first, walked, pages, streamed, listed

    created, first, walked, pages, streamed, listed = asyncio.run(scenario())
    assert [e.id for e in streamed] == [e.id for e in listed] and streamed[-1].data["stage"] == "cancelled"
    everything, after = [], None  # the listing read page by page with plain HTTP
    while True:
        page = client.get("/distillation/jobs", params={"limit": 50, **({"after": after} if after else {})}).json()
        everything += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert len(first.data) == 2 and first.has_more and len(pages) == -(-len(everything) // 2)
    assert [j.id for j in walked] == [j["id"] for j in everything]  # every job, newest first, no repeats
    assert {j.id for j in created} <= {j.id for j in walked}
    assert [j.id for page in pages for j in page.data] == [j.id for j in walked]


def test_errors_are_typed_and_carry_the_servers_message(sdk, client):
    with pytest.raises(NotFoundError) as caught:
        sdk.jobs.retrieve(UNKNOWN_JOB)
    server = client.get(f"/distillation/jobs/{UNKNOWN_JOB}").json()
    assert caught.value.status == 404 and caught.value.param == server["param"] == "job_id"
    assert server["detail"] in str(caught.value) and caught.value.detail == server["detail"]

    with pytest.raises(NotFoundError):
        sdk.jobs.events(UNKNOWN_JOB, stream=True)

    with pytest.raises(UnprocessableError) as caught:
        sdk.jobs.create(task="classification", student={"architecture": {"kind": "mlp", "hidden_dims": [4]}},
                        training_file="file-doesnotexist", teacher={"file_id": "file-doesnotexist"},
                        hyperparameters={"epochs": 0})
    assert caught.value.param and caught.value.param in str(caught.value)
    assert caught.value.detail in str(caught.value)


def _cli(args, api_url, api_key, cwd, engine=False):
    """``distill ARGS`` (the engine's command, which hands remote commands to the client) or, quicker
    as it needs no torch, the client's own ``python -m distill_client ARGS``."""
    env = client_env(dict(os.environ), DISTILL_API_KEY=api_key, DISTILL_BASE_URL=api_url)
    env.pop("DISTILL_DATABASE_URL", None)
    module = "distill.cli" if engine else "distill_client"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_cli_follows_a_job_to_its_evaluation(api_url, api_key, sdk, workers, problem, tmp_path):
    teacher = sdk.files.create(file=problem.teacher, purpose="model")
    upload = _cli(["files", "upload", str(problem.train_csv), "--purpose", "dataset", "--json"], api_url, api_key,
                  tmp_path)
    assert upload.returncode == 0, upload.stderr
    training = json.loads(upload.stdout)
    validation = sdk.files.create(file=problem.val_csv, purpose="dataset")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(job_body(teacher.id, training["id"], validation.id, epochs=3)))

    run = _cli(["jobs", "create", str(spec), "--follow"], api_url, api_key, tmp_path, engine=True)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    print(out)  # shown by pytest when an assertion below fails
    job_id = re.search(r"created (job-\w+)", out).group(1)
    job = sdk.jobs.retrieve(job_id)
    total = job.progress.total_steps
    assert job.status == "succeeded" and f"step {total}/{total} [{'#' * 24}] 100%" in out
    assert "ETA" in out and "epoch 3/3" in out
    # the live losses, as the job recorded them
    for record in [e.data for e in sdk.jobs.events(job_id) if e.type == "metrics"]:
        assert f"train_loss {record['train_loss']:.4f}" in out
        assert f"validation_loss {record['validation_loss']:.4f}" in out
    assert "[stage] training" in out and "[stage] succeeded" in out
    evaluation = sdk.models.retrieve(job.result_model_id).evaluation
    table = out.split("\nevaluation\n", 1)[1]
    assert re.search(r"metric\s+teacher\s+student", table)
    assert re.search(rf"accuracy\s+{evaluation['teacher']['accuracy']:.4f}\s+{evaluation['student']['accuracy']:.4f}",
                     table)
    assert re.search(rf"agreement\s+{evaluation['agreement']:.4f}", table)

    listed = _cli(["jobs", "list", "--json", "--limit", "5"], api_url, api_key, tmp_path)
    assert listed.returncode == 0 and job_id in [j["id"] for j in json.loads(listed.stdout)]
    got = _cli(["jobs", "get", job_id, "--json"], api_url, api_key, tmp_path)
    assert json.loads(got.stdout)["result_model_id"] == job.result_model_id
    events = _cli(["jobs", "events", job_id, "--follow", "--json"], api_url, api_key, tmp_path)
    lines = [json.loads(line) for line in events.stdout.splitlines()]
    assert [e["id"] for e in lines] == [e.id for e in sdk.jobs.events(job_id)]
    download = _cli(["models", "download", job.result_model_id, "-o", str(tmp_path / "m.safetensors"), "--json"],
                    api_url, api_key, tmp_path)
    assert json.loads(download.stdout)["bytes"] == (tmp_path / "m.safetensors").stat().st_size > 0
    rows = json.dumps([[float(v) for v in problem.val_x[0].tolist()]])
    predicted = _cli(["models", "predict", job.result_model_id, rows, "--json"], api_url, api_key, tmp_path)
    assert len(json.loads(predicted.stdout)["predictions"]) == 1


def test_cli_json_follow_and_errors(api_url, api_key, sdk, workers, problem, tmp_path):
    teacher = sdk.files.create(file=problem.teacher, purpose="model")
    training = sdk.files.create(file=problem.train_csv, purpose="dataset")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(job_body(teacher.id, training.id, epochs=2)))
    run = _cli(["jobs", "create", str(spec), "--follow", "--json"], api_url, api_key, tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)  # one JSON document: the finished job and its evaluation
    assert result["status"] == "succeeded" and 0 < result["evaluation"]["agreement"] <= 1
    assert result["result_model_id"] == sdk.jobs.retrieve(result["id"]).result_model_id

    missing = _cli(["jobs", "get", UNKNOWN_JOB], api_url, api_key, tmp_path)
    detail = sdk._transport.http.get(f"{api_url}/v1/distillation/jobs/{UNKNOWN_JOB}",
                                     headers={"Authorization": f"Bearer {api_key}"}).json()["detail"]
    assert missing.returncode == 1 and detail in missing.stderr

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**job_body(teacher.id, training.id), "hyperparameters": {"epochs": 0}}))
    refused = _cli(["jobs", "create", str(bad), "--follow"], api_url, api_key, tmp_path)
    assert refused.returncode == 1 and "hyperparameters.epochs" in refused.stderr


def test_estimate_and_webhooks(sdk, problem):
    teacher = sdk.files.create(file=problem.teacher, purpose="model")
    training = sdk.files.create(file=problem.train_csv, purpose="dataset")
    before = [j.id for j in sdk.jobs.list(limit=5).data]
    estimate = sdk.jobs.estimate(job_body(teacher.id, training.id, epochs=3))
    assert estimate.object == "distillation.job.estimate" and estimate.epochs == 3 and estimate.rows > 0
    assert [j.id for j in sdk.jobs.list(limit=5).data] == before  # nothing was queued

    endpoint = sdk.webhooks.create(url="http://127.0.0.1:9/hook", events=["job.succeeded"], description="client")
    assert endpoint.secret and endpoint.events == ["job.succeeded"]
    fetched = sdk.webhooks.retrieve(endpoint.id)
    assert fetched.url == endpoint.url and fetched.secret is None  # the secret is shown once
    assert endpoint.id in [w.id for w in sdk.webhooks.list()]
    assert list(sdk.webhooks.deliveries(endpoint.id)) == []
    assert sdk.webhooks.delete(endpoint.id).deleted
    with pytest.raises(NotFoundError):
        sdk.webhooks.retrieve(endpoint.id)


def test_following_a_job_that_does_not_succeed_exits_non_zero(api_url, api_key, sdk, workers, problem, tmp_path):
    teacher = sdk.files.create(file=problem.teacher, purpose="model")
    training = sdk.files.create(file=problem.train_csv, purpose="dataset")
    job = sdk.jobs.create(job_body(teacher.id, training.id, epochs=500))  # long enough to be stopped midway
    env = client_env(dict(os.environ), DISTILL_API_KEY=api_key, DISTILL_BASE_URL=api_url)
    follower = subprocess.Popen([sys.executable, "-m", "distill_client", "jobs", "follow", job.id], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for event in sdk.jobs.events(job.id, stream=True):
            if event.type == "metrics":  # training under way: stop it
                sdk.jobs.cancel(job.id)
                break
        out, err = follower.communicate(timeout=120)
    finally:
        follower.kill()
    final = sdk.jobs.retrieve(job.id)
    assert final.status == "cancelled"
    assert follower.returncode == 1 and f"job {job.id} cancelled" in err
    assert "[stage] training" in out and "[stage] cancelled" in out and "evaluation" not in out
