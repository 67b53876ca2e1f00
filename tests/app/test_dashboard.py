"""The dashboard at /dashboard, driven in a real headless Chromium (Debian's ``chromium``, which
scripts/test.sh installs) against the live stack: API key entry, a job followed live to
``succeeded``, its loss curves and evaluation table, the model download, and the predict try-out."""

from __future__ import annotations

import hashlib
import re
import shutil
from urllib.parse import urlparse

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from .helpers import job_body, submit, upload

EPOCHS = 5
TIMEOUT_MS = 120_000


def chromium_path() -> str:
    path = shutil.which("chromium")
    # Not a skip: the dashboard test is part of the suite, and scripts/test.sh installs the browser.
    assert path, "the dashboard test needs Debian's chromium: apt-get install -y chromium (scripts/test.sh does)"
    return path


@pytest.fixture
def browser_page(api_url):
    """A 1280x800 page; it records every request, every answer >= 400 and every console error or
    uncaught exception."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.problems, page.requests, page.failures = [], [], []
            page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
                    and page.problems.append(f"console: {m.text}"))
            page.on("response", lambda r: r.status >= 400 and page.failures.append((r.status, r.url)))
            page.on("pageerror", lambda e: page.problems.append(f"exception: {e}"))
            page.on("request", lambda r: page.requests.append(r.url))
            yield page
        finally:
            browser.close()


def sig4(value: float) -> float:
    """What the dashboard shows for a float: 4 significant digits."""
    return float(f"{value:.4g}")


def test_dashboard_page_is_served_without_a_key(api_url):
    response = httpx.get(api_url + "/dashboard")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    for path in re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', response.text):
        assert httpx.get(api_url + path).status_code == 200, path
    assert httpx.get(api_url + "/dashboard/jobs/job-x").text == response.text  # one shell; the script routes
    assert httpx.get(api_url + "/v1/distillation/jobs").status_code == 401  # the API still needs the key


def test_dashboard_follows_a_job_to_success_in_chromium(browser_page: Page, api_url, api_key, client, workers,
                                                        problem, tmp_path):
    page = browser_page
    page.goto(api_url + "/dashboard")

    # The key: a wrong one is refused with the API's message; the right one opens the jobs list.
    page.get_by_role("textbox", name="API key").fill("dsk_not-a-key")
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#key-error")).to_contain_text("refused")
    page.get_by_role("textbox", name="API key").fill(api_key)
    page.get_by_role("button", name="Use this key").click()
    expect(page.get_by_role("heading", name="Distillation jobs")).to_be_visible()
    assert page.evaluate("localStorage.getItem('distill.apiKey')") == api_key

    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    validation = upload(client, problem.val_csv, "dataset")
    job = submit(client, job_body(teacher["id"], training["id"], validation["id"], epochs=EPOCHS))

    # The list refreshes by itself: the new job shows up without a reload, and its link opens the job page.
    row = page.locator(f'#jobs tr[data-job="{job["id"]}"]')
    expect(row).to_be_visible(timeout=15_000)
    row.get_by_role("link", name=job["id"]).click()
    expect(page).to_have_url(f"{api_url}/dashboard/jobs/{job['id']}")

    # Live: the page reaches succeeded on its own, with the final stage in its event list.
    expect(page.locator('#job-summary [data-status="succeeded"]')).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#events li").last).to_contain_text("job succeeded", timeout=15_000)

    # Loss curves: one path per series with a point for every epoch, at the values of the metrics events.
    listed = client.get(f"/distillation/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    metrics = [e["data"] for e in listed if e["type"] == "metrics"]
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    for series in ("train_loss", "validation_loss"):
        path = page.locator(f'svg.loss-chart path[data-series="{series}"]')
        expect(path).to_have_attribute("data-points", str(EPOCHS))
        commands = re.findall(r"[ML]\s*[-\d.]+\s+[-\d.]+", path.get_attribute("d"))
        assert len(commands) == EPOCHS
        ys = [float(c.split()[-1]) for c in commands]
        values = [m[series] for m in metrics]
        # SVG y grows downwards: the drawn heights order like the losses.
        assert sorted(range(EPOCHS), key=lambda i: ys[i]) == sorted(range(EPOCHS), key=lambda i: -values[i])
    description = page.locator("#loss-chart-desc").text_content()
    assert f"epoch {EPOCHS}: {sig4(metrics[-1]['train_loss']):g}" in description
    page.get_by_label("Logarithmic scale").check()  # the same points, redrawn on a log axis
    expect(page.locator("svg.loss-chart")).to_have_attribute("data-scale", "log")
    expect(page.locator('svg.loss-chart path[data-series="train_loss"]')).to_have_attribute("data-points", str(EPOCHS))

    # Evaluation: teacher and student columns, with the model's numbers.
    finished = client.get(f"/distillation/jobs/{job['id']}").json()
    model = client.get(f"/models/{finished['result_model_id']}").json()
    total = finished["progress"]["total_steps"]
    expect(page.locator("#job-steps")).to_have_text(f"step {total} of {total}, epoch {EPOCHS} of {EPOCHS}")
    table = page.locator("table#evaluation")
    expect(table).to_be_visible(timeout=15_000)
    assert [t.strip() for t in table.locator("thead th").all_text_contents()] == ["metric", "teacher", "student"]
    accuracy = table.locator('tr[data-metric="accuracy"] td').all_text_contents()
    assert [float(v) for v in accuracy] == [sig4(model["evaluation"]["teacher"]["accuracy"]),
                                           sig4(model["evaluation"]["student"]["accuracy"])]
    parameters = table.locator('tr[data-metric="parameters"] td').all_text_contents()
    assert [int(v.replace(",", "")) for v in parameters] == [model["evaluation"]["teacher"]["parameters"],
                                                             model["parameters"]]

    # Download: the button fetches with the key and saves the model's exact bytes.
    with page.expect_download() as info:
        page.locator("#download-model").click()
    saved = tmp_path / info.value.suggested_filename
    info.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == model["sha256"]
    expect(page.locator("#job-actions .download-status").first).to_contain_text("Saved")

    # The model page's predict try-out answers what the API answers.
    page.get_by_role("link", name=model["id"]).first.click()
    expect(page.get_by_role("heading", name=f"Model {model['id']}")).to_be_visible()
    rows = problem.val_x[:3].tolist()
    page.get_by_label(re.compile("comma-separated numbers")).fill("\n".join(", ".join(map(str, r)) for r in rows))
    page.get_by_role("button", name="Predict").click()
    labels = page.locator("#predictions td.label")
    expect(labels).to_have_count(3)
    expected = client.post(f"/models/{model['id']}/predict", json={"inputs": rows}).json()["predictions"]
    assert [int(v) for v in labels.all_text_contents()] == [p["label"] for p in expected]

    # Everything came from the service itself, and the page raised nothing (a CSP violation is a console error).
    origin = urlparse(api_url).netloc
    assert [u for u in page.requests if not (u.startswith(("blob:", "data:")) or urlparse(u).netloc == origin)] == []
    assert page.problems == []
    assert page.failures == [(401, f"{api_url}/v1/models?limit=1")]  # only the wrong key's check
