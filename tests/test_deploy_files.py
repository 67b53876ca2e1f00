"""No Docker engine runs here, so the Dockerfile and compose file are checked by reading them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, pending = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        pending += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            lines.append((keyword.upper(), rest))
            pending = ""
    return lines


def test_compose_has_the_whole_stack():
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "api"} <= set(services)
    workers = [name for name in services if name.startswith("worker")]
    assert workers, "no worker service"
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["migrate"]["restart"] == "no"
    for name in ["api", *workers]:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert "artifacts:/data/artifacts" in services[name]["volumes"]
        env = services[name]["environment"]
        assert env["DISTILL_DATABASE_URL"].startswith("postgresql+psycopg2://") and "@postgres:" in env["DISTILL_DATABASE_URL"]
        assert env["DISTILL_BROKER_URL"].startswith("redis://redis:")
    assert services["api"]["command"][:2] == ["uvicorn", "app.main:app"]


def test_each_worker_reserves_one_gpu():
    services = compose()["services"]
    for name in (n for n in services if n.startswith("worker")):
        service = services[name]
        assert service["command"][:4] == ["celery", "-A", "worker.celery_app", "worker"]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"] and len(devices[0]["device_ids"]) == 1
        assert service["environment"]["DISTILL_DEVICE"].startswith("cuda")


def test_compose_named_volumes_are_declared():
    document = compose()
    used = {v.split(":")[0] for s in document["services"].values() for v in s.get("volumes", [])}
    assert used <= set(document["volumes"])


def test_dockerfile_builds_what_compose_runs():
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and "python:3.11" in instructions[0][1]
    copies = [rest.split()[:-1] for keyword, rest in instructions if keyword == "COPY"]
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    copied = {source for sources in copies for source in sources}
    assert {"app", "worker", "distill", "migrations", "alembic.ini", "pyproject.toml"} <= copied
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "torch==" in runs and "pip install ." in runs
    assert any(keyword == "USER" and rest != "root" for keyword, rest in instructions)
    # The modules the commands name exist.
    for module in ("app.main", "worker.celery_app", "worker.tasks"):
        assert importlib.util.find_spec(module) is not None, module
