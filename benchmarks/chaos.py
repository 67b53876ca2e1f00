"""Chaos: kill -9 and SIGTERM workers mid-training, and count what survives.

    .venv/bin/python benchmarks/chaos.py [--kills 3] [--terms 2] [--epochs 40]

Needs the test services (PostgreSQL on 127.0.0.1:5432, Redis on 127.0.0.1:6379; see
scripts/services.sh). It makes a database of its own, runs the API and worker processes
on a queue of their own with the liveness timeouts of tests/app/stack.py (heartbeat
timeout 3 s, reconciler every 1 s), and for each round: submits an MLP job, waits until
it trains with a checkpoint on disk, kills (SIGKILL) or stops (SIGTERM) its worker,
starts a fresh worker and waits for the job to finish. Prints: kills survived, restarts
survived, jobs lost (must be 0), duplicate runs (must be 0: a job finished twice or with
two models), and the time from a kill to the job's resumed training (median, max).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.app.helpers import events, job_body, upload, wait_for  # noqa: E402
from tests.app.stack import Stack  # noqa: E402
from tests.conftest import PG_HOST, PG_USER, REDIS_URL, _admin, _stop, create_api_key  # noqa: E402
from tests.factories import make_problem  # noqa: E402


def service_env(root: Path, database: str) -> dict:
    env = {**os.environ, "DISTILL_DATABASE_URL": f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:5432/{database}",
           "DISTILL_BROKER_URL": REDIS_URL, "DISTILL_ARTIFACTS_DIR": str(root / "artifacts"),
           "DISTILL_DEVICE": "cpu", "PYTHONUNBUFFERED": "1", "DISTILL_TENANT_MAX_RUNNING_JOBS": "1000"}
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    env["_API_KEY"] = create_api_key(env, "chaos")["key"]
    return env


def one_round(stack: Stack, files: tuple[str, str, str], how: signal.Signals, epochs: int) -> dict:
    client = stack.client
    worker = stack.start_worker()
    job = client.post("/distillation/jobs", json=job_body(*files, epochs=epochs, batch_size=8)).json()
    wait_for(client, job["id"], statuses={"running"}, timeout=180,
             condition=lambda j: j["progress"]["step"] >= 100 and stack.checkpoints(j["id"]))
    os.kill(worker.pid, how)
    hit = time.monotonic()
    worker.wait(timeout=60)
    replacement = stack.start_worker()
    resumed_at = None
    while resumed_at is None and time.monotonic() - hit < 180:
        if any(e["type"] == "stage" and e["data"]["stage"] == "resumed" for e in events(client, job["id"])):
            resumed_at = time.monotonic()
        time.sleep(0.2)
    final = wait_for(client, job["id"], timeout=240)
    _stop(replacement)  # the next round's job must run on the worker that round starts
    job_events = events(client, job["id"])
    models = [m for m in client.get("/models", params={"limit": 100}).json()["data"] if m["job_id"] == job["id"]]
    finished = [e for e in job_events if e["type"] == "stage" and e["data"]["stage"] == "succeeded"]
    return {"signal": how.name, "status": final["status"], "resume_s": resumed_at - hit if resumed_at else None,
            "duplicate": len(finished) > 1 or len(models) > 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILL rounds")
    parser.add_argument("--terms", type=int, default=2, help="SIGTERM rounds")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of each round's MLP job")
    args = parser.parse_args()
    database = f"distill_chaos_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{database}"')
    rounds: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            env = service_env(root, database)
            problem = make_problem(root / "problem")
            with Stack(env, root) as stack:
                files = (upload(stack.client, problem.teacher, "model")["id"],
                         upload(stack.client, problem.train_csv, "dataset")["id"],
                         upload(stack.client, problem.val_csv, "dataset")["id"])
                for how in [signal.SIGKILL] * args.kills + [signal.SIGTERM] * args.terms:
                    rounds.append(one_round(stack, files, how, args.epochs))
                    print(f"  {rounds[-1]}", flush=True)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    kills = [r for r in rounds if r["signal"] == "SIGKILL"]
    terms = [r for r in rounds if r["signal"] == "SIGTERM"]
    waits = [r["resume_s"] for r in kills if r["resume_s"] is not None]
    table = [
        ("kills survived", f"{sum(r['status'] == 'succeeded' for r in kills)} / {len(kills)}"),
        ("restarts (SIGTERM) survived", f"{sum(r['status'] == 'succeeded' for r in terms)} / {len(terms)}"),
        ("jobs lost (must be 0)", str(sum(r["status"] != "succeeded" for r in rounds))),
        ("duplicate runs (must be 0)", str(sum(r["duplicate"] for r in rounds))),
        ("kill -> resumed training, median s", f"{statistics.median(waits):.1f}" if waits else "n/a"),
        ("kill -> resumed training, max s", f"{max(waits):.1f}" if waits else "n/a"),
    ]
    print(f"\n{'figure':<38} value")
    print("-" * 50)
    for name, value in table:
        print(f"{name:<38} {value}")
    lost_or_duplicated = any(r["status"] != "succeeded" or r["duplicate"] for r in rounds)
    return 1 if lost_or_duplicated else 0


if __name__ == "__main__":
    sys.exit(main())
