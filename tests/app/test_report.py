"""GET /v1/models/{id}/report: a self-contained HTML page with the loss curves, the evaluation,
the spec, the lineage (ids and sha256s), device and duration; every user string escaped."""

from __future__ import annotations

import html
import json
import re

from app.services.report import loss_curves_svg

from .helpers import job_body, submit, upload, wait_for

HOSTILE_NAME = "<script>alert('file')</script>.safetensors"
HOSTILE_NOTE = "</pre><script>alert('metadata')</script><img src=x onerror=alert(1)>"
EPOCHS = 3


def _polyline_points(page: str, series: str) -> list[tuple[float, float]]:
    match = re.search(rf'<polyline[^>]*data-series="{series}"[^>]*points="([^"]+)"', page)
    assert match, f"no {series} curve"
    return [tuple(map(float, point.split(","))) for point in match.group(1).split()]


def test_model_report(client, workers, problem):
    teacher = upload(client, problem.teacher, "model", filename=HOSTILE_NAME)
    assert teacher["filename"] == HOSTILE_NAME  # stored as given: the report must escape it
    training = upload(client, problem.train_csv, "dataset")
    validation = upload(client, problem.val_csv, "dataset")
    body = job_body(teacher["id"], training["id"], validation["id"], epochs=EPOCHS)
    body["metadata"] = {"note": HOSTILE_NOTE}
    job = wait_for(client, submit(client, body)["id"])
    assert job["status"] == "succeeded", job["error"]
    model = client.get(f"/models/{job['result_model_id']}").json()

    response = client.get(f"/models/{model['id']}/report")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]  # it loads nothing
    page = response.text

    # Self-contained and escaped: no script at all, no external URL, the hostile strings shown as text.
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?https?:""", page)
    assert html.escape(HOSTILE_NAME) in page
    assert "&lt;/pre&gt;&lt;script&gt;" in page

    # Loss curves: an inline SVG with one polyline per curve, a point per epoch; lower loss drawn lower.
    assert "<svg" in page
    for series in ("train_loss", "validation_loss"):
        assert len(_polyline_points(page, series)) == EPOCHS
    train = [e for e in client.get(f"/distillation/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
             if e["type"] == "metrics"]
    losses = [e["data"]["train_loss"] for e in train]
    ys = [y for _, y in _polyline_points(page, "train_loss")]
    assert [a < b for a, b in zip(losses, losses[1:])] == [a > b for a, b in zip(ys, ys[1:])]

    # The evaluation table: teacher vs student, with the numbers the model object has.
    assert "<th>teacher</th><th>student</th>" in page
    accuracy_row = re.search(r"<tr><td>accuracy</td><td>([^<]+)</td><td>([^<]+)</td></tr>", page)
    assert accuracy_row, "no accuracy row"
    evaluation = model["evaluation"]
    assert float(accuracy_row.group(1)) == float(f"{evaluation['teacher']['accuracy']:.6g}")
    assert float(accuracy_row.group(2)) == float(f"{evaluation['student']['accuracy']:.6g}")
    assert f"<td>agreement</td><td>{evaluation['agreement']:.6g}</td>" in page

    # The exact spec, as JSON.
    spec_text = re.search(r'<pre class="spec">(.*?)</pre>', page, re.S).group(1)
    assert json.loads(html.unescape(spec_text)) == job["spec"]
    assert json.loads(html.unescape(spec_text))["metadata"]["note"] == HOSTILE_NOTE

    # Lineage: every input's id and sha256 (from the files table), the model's own sha256.
    for record in (teacher, training, validation):
        assert record["id"] in page and record["sha256"] in page
    assert model["sha256"] in page

    # Device and duration (started_at -> finished_at).
    assert "<dt>device</dt><dd>cpu</dd>" in page
    assert f"({job['finished_at'] - job['started_at']} s)</dd>" in page


def test_report_of_a_model_whose_job_was_deleted(client, workers, problem):
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    job = wait_for(client, submit(client, job_body(teacher["id"], training["id"], epochs=1))["id"])
    assert job["status"] == "succeeded", job["error"]
    assert client.delete(f"/distillation/jobs/{job['id']}").status_code == 200
    page = client.get(f"/models/{job['result_model_id']}/report")
    assert page.status_code == 200
    assert "the job that made this model was deleted" in page.text and job["result_model_id"] in page.text


def test_report_of_an_unknown_model_is_a_404(client):
    response = client.get("/models/model-000000000000000000000000/report")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["param"] == "model_id"


def test_loss_curves_svg_handles_one_epoch_and_missing_values():
    one = loss_curves_svg([{"epoch": 1, "train_loss": 0.5, "validation_loss": None}])
    assert one.count("<polyline") == 1 and 'data-series="train_loss"' in one and "<circle" in one
    skipped = loss_curves_svg([{"epoch": 1, "train_loss": float("nan")}, {"epoch": 2, "train_loss": float("inf")},
                               {"epoch": 3, "train_loss": 0.25}])
    assert "nan" not in skipped.lower() and "inf" not in skipped.lower() and skipped.count("<circle") == 1
    assert "<svg" not in loss_curves_svg([])


def test_card_markdown_lineage_and_exact_spec():
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from app.services.report import Input, Report, card_markdown

    spec = {"teacher": {"file_id": "file-1"}, "metadata": {"note": "```\n| <b>x</b>"}}
    started = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    job = SimpleNamespace(id="job-1", device="cpu", started_at=started, spec=spec)
    inputs = [Input("teacher", "file-1", "a|<script>.safetensors", "ab" * 32, 123)]
    card = card_markdown(Report(model=None, job=job, inputs=inputs), now=started.replace(minute=2))
    assert f"| teacher | file-1 | a\\|&lt;script&gt;.safetensors | {'ab' * 32} | 123 |" in card
    assert "- Device: cpu" in card and "- Training time (to export): 120 s" in card
    fence, body = re.search(r"\n(`{3,})json\n(.*)\n\1\n", card, re.S).groups()
    assert len(fence) == 4 and json.loads(body) == spec  # a fence longer than the spec's own backticks


def test_append_to_card_adds_lineage_from_the_files_table(tmp_path):
    """What the worker adds to an HF model's README.md before packing it (in-memory SQLite here:
    the same tables and queries, without the stack)."""
    from datetime import datetime, timezone

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.services.report import append_to_card
    from app.tables import Base, FileRecord, Job

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    spec = {"task": "causal_lm", "teacher": {"file_id": "file-t"}, "student": {"architecture": {}},
            "training_file": "file-d", "metadata": {}}
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: transformers\n---\n\n# student\n", encoding="utf-8")
    with Session(engine) as session:
        session.add_all([
            FileRecord(id="file-t", tenant_id="a", filename="teacher.tar.gz", purpose="model", bytes=10,
                       sha256="1" * 64, storage_key="k1", details={}),
            FileRecord(id="file-d", tenant_id="a", filename="<b>data</b>.jsonl", purpose="dataset", bytes=20,
                       sha256="2" * 64, storage_key="k2", details={}),
            Job(id="job-x", tenant_id="a", status="running", spec=spec, device="cuda:0",
                started_at=datetime(2026, 1, 1, tzinfo=timezone.utc))])
        session.commit()
        assert not append_to_card(session, card, "b", "job-x")  # another tenant's job: nothing added
        assert append_to_card(session, card, "a", "job-x")
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\nlibrary_name: transformers\n---")  # the engine's card is kept
    assert f"| teacher | file-t | teacher.tar.gz | {'1' * 64} | 10 |" in text
    assert f"| training_file | file-d | &lt;b&gt;data&lt;/b&gt;.jsonl | {'2' * 64} | 20 |" in text
    assert "- Device: cuda:0" in text and '"training_file": "file-d"' in text
