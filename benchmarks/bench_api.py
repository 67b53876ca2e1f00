"""The API's create + get path at C concurrent clients (worker stopped), one table, one run.

Issue 9: "API create + get at 64 concurrent clients (worker stopped): about 95 creates/s, create
p99 783 ms, get p99 660 ms"; goal: p99 <= 150 ms for both.

Runs against the real stack the service is deployed on: a scratch PostgreSQL database per variant
on 127.0.0.1:5432 (``bench_api_<pid>_<variant>``, created and dropped here, migrated by that
variant's own ``alembic upgrade head``) and a scratch Redis database as the broker (no worker
consumes it, so every job stays queued; its queue is deleted between runs). For each variant it
uploads one small MLP teacher and one CSV once (the cheapest valid job spec), then each run starts a
fresh API (uvicorn) and C closed-loop clients, each doing ``POST /v1/distillation/jobs`` and then
``GET /v1/distillation/jobs/{id}``, for D seconds (``--idempotency-key``: every create sends one, as
the Python client does). Before every run the jobs (and their events and idempotency keys) are truncated, so
every run starts from an empty queue and the queue grows by the same few thousand jobs in each.

- ``baseline``: the app/ (and migrations/, distill/) of ``--baseline-rev`` (default 43ebf61, the
  commit issue 9 measured), ``git archive``-d into a temporary folder
- ``current``: this checkout
- ``current-w2``: this checkout under ``uvicorn --workers 2`` (optional; see the README's advice)

Runs are interleaved (baseline, current, baseline, current, ...) --repeats times; the table shows
each variant's median-throughput run. The tenant's queued-job limit is lifted for the run
(DISTILL_TENANT_MAX_RUNNING_JOBS), or every client would get 429 after 8 jobs.

    .venv/bin/python benchmarks/bench_api.py [--clients 64] [--seconds 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg2
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import _summary  # noqa: E402
from bench_predict import free_port, start, stop, upload_files, wait_healthy  # noqa: E402

PG = {"host": os.environ.get("DISTILL_TEST_PG_HOST", "127.0.0.1"), "user": os.environ.get("DISTILL_TEST_PG_USER",
                                                                                            "postgres")}
REDIS_URL = os.environ.get("DISTILL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
GOAL_MS = 150.0


def admin(statement: str, database: str = "postgres") -> None:
    connection = psycopg2.connect(dbname=database, **PG)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def api_command(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log", *(["--workers", str(workers)] if workers > 1 else [])]


class Variant:
    """One app/ to measure, with a scratch database of its own (migrated by its own migrations)."""

    def __init__(self, name: str, cwd: Path, scratch: Path, queue: str, workers: int = 1):
        self.name, self.cwd, self.workers = name, cwd, workers
        self.database = f"bench_api_{os.getpid()}_{name.replace('-', '_')}"
        self.env = {**os.environ, "DISTILL_DATABASE_URL": f"postgresql+psycopg2://{PG['user']}@{PG['host']}:5432/"
                                                          f"{self.database}",
                    "DISTILL_BROKER_URL": REDIS_URL, "DISTILL_QUEUE": queue, "DISTILL_DEVICE": "cpu",
                    "DISTILL_ARTIFACTS_DIR": str(scratch / name / "artifacts"),
                    "DISTILL_TENANT_MAX_RUNNING_JOBS": str(10**9), "PYTHONUNBUFFERED": "1"}
        if cwd != ROOT:
            self.env["PYTHONPATH"] = str(cwd)  # its app/ and distill/ before the installed checkout's
        self.log = scratch / f"{name}.log"
        self.key = self.body = None

    def set_up(self, problem) -> None:
        """Create and migrate the database, make an API key, upload the teacher and the data once."""
        admin(f'CREATE DATABASE "{self.database}"')
        subprocess.run([sys.executable, "-m", "alembic", "-c", str(self.cwd / "alembic.ini"), "upgrade", "head"],
                       cwd=self.cwd, env=self.env, check=True, capture_output=True)
        out = subprocess.run([sys.executable, "-m", "app.admin", "keys", "create", "--tenant", "bench", "--json"],
                             cwd=self.cwd, env=self.env, check=True, capture_output=True, text=True).stdout
        self.key = json.loads(out)["key"]
        with self.api() as url, httpx.Client(base_url=url + "/v1", timeout=60,
                                             headers={"Authorization": f"Bearer {self.key}"}) as http:
            ids = upload_files(http, {"teacher": (problem.teacher, "model"), "train": (problem.train_csv, "dataset")})
        self.body = json.dumps({"task": "classification", "teacher": {"file_id": ids["teacher"]},
                                "student": {"architecture": {"kind": "mlp", "hidden_dims": [16]}},
                                "training_file": ids["train"], "hyperparameters": {"epochs": 1}}).encode()

    def reset(self) -> None:
        """An empty queue before every run: no jobs, events or idempotency keys; no broker messages."""
        admin("TRUNCATE jobs, job_events, idempotency_keys, webhook_deliveries CASCADE", self.database)
        admin("VACUUM ANALYZE", self.database)
        redis.Redis.from_url(REDIS_URL).delete(self.env["DISTILL_QUEUE"])

    def api(self):
        variant = self

        class Running:
            def __enter__(self) -> str:
                port = free_port()
                self.process = start(api_command(port, variant.workers), variant.env, variant.cwd, variant.log)
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url, self.process, variant.log)
                return url

            def __exit__(self, *exc) -> None:
                stop(self.process)

        return Running()

    def tear_down(self) -> None:
        admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


async def _request(reader, writer, method: str, path: str, key: str, body: bytes | None = None,
                   headers: str = "") -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive request on an open connection (a minimal client: the load generator shares
    the CPUs with the server, so it should cost little)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n{headers}"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write((head + "\r\n").encode() + (body or b""))
    response = await reader.readuntil(b"\r\n\r\n")
    status = int(response.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in response.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


async def load(url: str, key: str, body: bytes, clients: int, seconds: float, idempotency: bool) -> dict:
    host, port = url.removeprefix("http://").split(":")
    create_path, connections = "/v1/distillation/jobs", []
    for _ in range(clients):
        connections.append(await asyncio.open_connection(host, int(port)))
    creates, gets, statuses = [], [], {}
    stop_at = time.perf_counter() + seconds

    async def client(n: int):
        reader, writer = connections[n]
        while time.perf_counter() < stop_at:
            headers = f"Idempotency-Key: {uuid.uuid4()}\r\n" if idempotency else ""
            began = time.perf_counter()
            status, text = await _request(reader, writer, "POST", create_path, key, body, headers)
            creates.append(time.perf_counter() - began)
            statuses[f"create {status}"] = statuses.get(f"create {status}", 0) + 1
            if status != 201:
                continue
            job_id = json.loads(text)["id"]
            began = time.perf_counter()
            status, _ = await _request(reader, writer, "GET", f"{create_path}/{job_id}", key)
            gets.append(time.perf_counter() - began)
            statuses[f"get {status}"] = statuses.get(f"get {status}", 0) + 1

    began = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - began
    for _, writer in connections:
        writer.close()
    ok = statuses.get("create 201", 0)
    return {"creates_s": ok / elapsed, "create_p50": _percentile(creates, 0.5), "create_p99": _percentile(creates, 0.99),
            "get_p50": _percentile(gets, 0.5), "get_p99": _percentile(gets, 0.99), "creates": ok,
            "errors": sum(n for s, n in statuses.items() if s not in ("create 201", "get 200")), "statuses": statuses}


def run_once(variant: Variant, clients: int, seconds: float, idempotency: bool) -> dict:
    variant.reset()
    with variant.api() as url:
        # warm up: one create + get (first-request imports, connection pool)
        asyncio.run(load(url, variant.key, variant.body, 1, 0.5, idempotency))
        variant.reset()
        return asyncio.run(load(url, variant.key, variant.body, clients, seconds, idempotency))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["baseline", "current"],
                        choices=["baseline", "current", "current-w2"])
    parser.add_argument("--baseline-rev", default="43ebf61", help="the commit whose app/ is the baseline")
    parser.add_argument("--idempotency-key", action="store_true",
                        help="send an Idempotency-Key with every create, as the Python client does (43ebf61 then "
                             "deadlocks on its connection pool: 500s after 30 s)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs) and databases")
    args = parser.parse_args()

    from tests.factories import make_problem

    redis.Redis.from_url(REDIS_URL).ping()
    scratch = Path(tempfile.mkdtemp(prefix="bench-api-"))
    queue = f"bench-api-{os.getpid()}"
    baseline_dir = scratch / "baseline-src"
    baseline_dir.mkdir()
    archive = subprocess.run(["git", "archive", args.baseline_rev, "app", "migrations", "distill", "alembic.ini"],
                             cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(baseline_dir)], input=archive, check=True)
    made = {"baseline": lambda: Variant("baseline", baseline_dir, scratch, queue),
            "current": lambda: Variant("current", ROOT, scratch, queue),
            "current-w2": lambda: Variant("current-w2", ROOT, scratch, queue, workers=2)}
    variants = [made[name]() for name in args.variants]
    try:
        problem = make_problem(scratch / "problem")
        for variant in variants:
            variant.set_up(problem)
        runs: dict[str, list[dict]] = {v.name: [] for v in variants}
        for repeat in range(args.repeats):  # interleaved: a change in the machine's load hits every variant
            for variant in variants:
                r = run_once(variant, args.clients, args.seconds, args.idempotency_key)
                runs[variant.name].append(r)
                print(f"  [{repeat + 1}/{args.repeats}] {variant.name}: {r['creates_s']:.0f} creates/s, create p50 "
                      f"{r['create_p50']:.0f} p99 {r['create_p99']:.0f} ms, get p50 {r['get_p50']:.0f} p99 "
                      f"{r['get_p99']:.0f} ms ({r['creates']} jobs, {r['errors']} errors {r['statuses']})", flush=True)
        results = {name: sorted(rs, key=lambda r: r["creates_s"])[len(rs) // 2] for name, rs in runs.items()}
        report(results, args)
    finally:
        for variant in variants:
            if not args.keep:
                variant.tear_down()
        redis.Redis.from_url(REDIS_URL).delete(queue)
        if args.keep:
            print(f"scratch folder: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def report(results: dict[str, dict], args) -> None:
    base = results.get("baseline")
    print(f"\nPOST /v1/distillation/jobs + GET /v1/distillation/jobs/{{id}}, {args.clients} closed-loop clients, "
          f"{args.seconds:g} s per run, worker stopped, PostgreSQL + Redis, {os.cpu_count()} CPUs "
          f"(median-throughput run of {args.repeats})")
    print(f"{'variant':<11} {'creates/s':>9} {'create p50':>10} {'create p99':>10} {'get p50':>8} {'get p99':>8} "
          f"{'errors':>6} {'x base':>6}")
    for name, r in results.items():
        ratio = f"{r['creates_s'] / base['creates_s']:.2f}" if base else "-"
        print(f"{name:<11} {r['creates_s']:>9.0f} {r['create_p50']:>10.0f} {r['create_p99']:>10.0f} "
              f"{r['get_p50']:>8.0f} {r['get_p99']:>8.0f} {r['errors']:>6} {ratio:>6}")
    current = results.get("current")
    if current is None:
        return
    print(f"goal: create p99 <= {GOAL_MS:.0f} ms ({current['create_p99']:.0f} ms), get p99 <= {GOAL_MS:.0f} ms "
          f"({current['get_p99']:.0f} ms)")
    for what in ("create", "get"):
        p99 = current[f"{what}_p99"]
        peer = f"{args.baseline_rev}: {base[f'{what}_p99']:.0f} ms" if base else "-"
        ratio = base[f"{what}_p99"] / p99 if base and p99 else None
        _summary.record(f"API {what} p99 at {args.clients} clients", f"{p99:.0f} ms", peer, ratio,
                        f"<= {GOAL_MS:.0f} ms", p99 <= GOAL_MS)
    if base:
        _summary.record(f"API creates/s at {args.clients} clients", f"{current['creates_s']:.0f}/s",
                        f"{args.baseline_rev}: {base['creates_s']:.0f}/s", current["creates_s"] / base["creates_s"],
                        "p99 <= 150 ms (throughput: higher is better)", None)


if __name__ == "__main__":
    main()
