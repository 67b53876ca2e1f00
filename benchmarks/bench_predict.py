"""/predict throughput and latency at C concurrent single-row clients, one table, one run.

Starts its own service on the embedded defaults (a scratch SQLite database, a local artifacts folder
and Celery's filesystem broker), trains one tiny MLP student with a worker (1 epoch), stops the
worker, then for each variant starts a fresh API (one uvicorn process) and runs C closed-loop clients
(asyncio + httpx, each sending one row, waiting for the answer, sending the next) for D seconds:

- ``batched``: this checkout, micro-batching on (DISTILL_PREDICT_MAX_BATCH=64, MAX_WAIT_MS=2), on the
  server stack this checkout installs (uvicorn[standard]: httptools + uvloop, which uvicorn picks itself)
- ``unbatched``: the same with DISTILL_PREDICT_MAX_BATCH=1 (one forward per request)
- ``HEAD``: the app/ of ``--baseline-rev`` (default 3883e45, the last commit before micro-batching;
  ``git archive``), same database, on the server stack that revision installed: plain uvicorn, i.e.
  ``--http h11 --loop asyncio`` (forced here, since this venv has httptools and uvloop). This is
  "today's throughput" the goal is a multiple of.
- ``HEAD-std`` (not run unless named in --variants): the same baseline app on httptools + uvloop, to
  tell the server stack's part of the gain from the code's (1.05x HEAD in one run: nearly all is code)
- ``bare``: a bare FastAPI sync route returning a constant prediction (no auth, no database, no model),
  on httptools + uvloop

Each variant runs --repeats times, interleaved; the table shows each one's median-throughput run.
The clients are a minimal asyncio HTTP/1.1 keep-alive loop (they share the CPUs with the server).
Prints requests/s, p50/p99 latency in ms, the server's CPU time per request (user + system, the
API process and its threads; steadier than requests/s on a shared machine), and each variant's
throughput as a ratio of HEAD's. Goal (issue 9): batched >= 3x HEAD's requests/s, p99 <= 100 ms.

One uvicorn process serves each variant. That is the right default here: with micro-batching a
process's forwards are shared by all its clients, the CPUs are shared with the load generator, and
a second process would hold a second copy of each model and halve each batch. On a machine with
idle cores, ``--workers N`` (one per core) multiplies the HTTP side; each process batches alone.

    .venv/bin/python benchmarks/bench_predict.py [--clients 32] [--seconds 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
import _summary  # noqa: E402

BARE = '''
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class Body(BaseModel):
    inputs: list[list[float]]


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.post("/v1/models/{model_id}/predict")
def predict(model_id: str, body: Body):
    return {"object": "list", "model": model_id,
            "predictions": [{"label": 0, "probabilities": [0.5, 0.25, 0.25]} for _ in body.inputs]}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the API exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the API did not come up; see {log}")


def migrate_and_create_key(env: dict) -> str:
    """Bring the scratch database to the schema head and create an API key (tenant "bench"): the key."""
    subprocess.run([sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    key = subprocess.run([sys.executable, "-m", "app.admin", "keys", "create", "--tenant", "bench", "--json"],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(key)["key"]


def upload_files(http: httpx.Client, files: dict[str, tuple[Path, str]]) -> dict[str, str]:
    """Upload {name: (path, purpose)}; {name: file id}."""
    ids = {}
    for name, (path, purpose) in files.items():
        with open(path, "rb") as handle:
            response = http.post("/files", files={"file": (path.name, handle)}, data={"purpose": purpose})
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    return ids


def train_on_stack(env: dict, scratch: Path, key: str, files: dict[str, tuple[Path, str]],
                   body: Callable[[dict[str, str]], dict], timeout_s: float) -> str:
    """Start an API and one worker, upload ``files``, submit ``body(file ids)``, wait for the job and stop
    both: the finished model's id (SystemExit naming the worker log if the job fails or times out)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
                env, ROOT, scratch / "train-api.log")
    worker = start([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO",
                    "--concurrency", "1"], env, ROOT, scratch / "worker.log")
    try:
        wait_healthy(url, api, scratch / "train-api.log")
        with httpx.Client(base_url=url + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
            response = http.post("/distillation/jobs", json=body(upload_files(http, files)))
            assert response.status_code in (200, 201, 202), response.text
            job = response.json()
            deadline = time.monotonic() + timeout_s
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"the training job did not finish; see {scratch}/worker.log")
                time.sleep(0.5)
                job = http.get(f"/distillation/jobs/{job['id']}").json()
            if job["status"] != "succeeded":
                raise SystemExit(f"the training job {job['status']}: {job['error']}")
            return job["result_model_id"]
    finally:
        stop(worker)
        stop(api)


def train_model(env: dict, scratch: Path, hidden: list[int]) -> tuple[str, list[list[float]], str]:
    """(model id, rows to send, API key): a 1-epoch MLP student trained by a real worker."""
    from tests.factories import make_problem

    key = migrate_and_create_key(env)
    problem = make_problem(scratch / "problem")
    model_id = train_on_stack(
        env, scratch, key, {"teacher": (problem.teacher, "model"), "train": (problem.train_csv, "dataset")},
        lambda ids: {"task": "classification", "teacher": {"file_id": ids["teacher"]},
                     "student": {"architecture": {"kind": "mlp", "hidden_dims": hidden}},
                     "training_file": ids["train"], "hyperparameters": {"epochs": 1, "batch_size": 32}}, 300)
    return model_id, problem.val_x[:256].tolist(), key


async def _post(reader, writer, host: str, path: str, key: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive POST on an open connection (a minimal client: the load generator shares
    the CPUs with the server, so it should cost little)."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


async def load(url: str, key: str, model_id: str, rows: list, clients: int, seconds: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    path = f"/v1/models/{model_id}/predict"
    bodies = [json.dumps({"inputs": [row]}).encode() for row in rows]
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]
    for (reader, writer), body in zip(connections, bodies):  # warm up: the model loads
        status, text = await _post(reader, writer, url, path, key, body)
        assert status == 200, text
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(n: int):
        nonlocal errors
        reader, writer = connections[n]
        i = n
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            status, _ = await _post(reader, writer, url, path, key, bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - began)
            errors += status != 200
            i += clients

    began = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - began
    for _, writer in connections:
        writer.close()
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return {"rps": len(latencies) / elapsed, "p50": pick(0.50), "p99": pick(0.99), "n": len(latencies),
            "errors": errors}


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of a process (all its threads) and its children."""
    return sum(sum(p.cpu_times()[:2]) for p in (process, *process.children(recursive=True)))


def run_variant(name: str, command_cwd: Path, env: dict, app: str, server: list[str], scratch: Path, key: str,
                model_id: str, rows: list, clients: int, seconds: float) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = scratch / f"{name}.log"
    api = start([sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "warning", "--no-access-log", *server], env, command_cwd, log)
    try:
        wait_healthy(url, api, log)
        process = psutil.Process(api.pid)
        before = cpu_seconds(process)
        result = asyncio.run(load(url, key, model_id, rows, clients, seconds))
        result["cpu_us"] = (cpu_seconds(process) - before) / (result["n"] + clients) * 1e6  # + the warm-up ones
        return result
    finally:
        stop(api)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--variants", nargs="+", default=["HEAD", "unbatched", "batched", "bare"],
                        help="any of HEAD, HEAD-std, unbatched, batched, bare")
    parser.add_argument("--baseline-rev", default="3883e45",
                        help="the commit whose app/ is the 'HEAD' baseline (default: the last one before micro-batching)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[16], help="the student's hidden layer widths")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    env = {**os.environ, "DISTILL_DATABASE_URL": f"sqlite:///{scratch}/distill.db",
           "DISTILL_BROKER_URL": "filesystem://", "DISTILL_ARTIFACTS_DIR": str(scratch / "var" / "artifacts"),
           "DISTILL_DEVICE": "cpu", "DISTILL_QUEUE": "bench-predict", "PYTHONUNBUFFERED": "1"}
    for name in ("DISTILL_PREDICT_MAX_BATCH", "DISTILL_PREDICT_MAX_WAIT_MS"):
        env.pop(name, None)
    try:
        model_id, rows, key = train_model(env, scratch, args.hidden)
        head = scratch / "head"
        head.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline_rev, "app", "distill"], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(head)], input=archive, check=True)
        (scratch / "bare").mkdir()
        (scratch / "bare" / "bare_app.py").write_text(BARE)
        baseline_stack = ["--http", "h11", "--loop", "asyncio"]  # plain uvicorn, as the baseline installed
        standard_stack = ["--http", "httptools", "--loop", "uvloop"]  # uvicorn[standard], as this checkout does
        variants = {
            "HEAD": (head, {**env, "PYTHONPATH": str(head)}, "app.main:app", baseline_stack),
            "HEAD-std": (head, {**env, "PYTHONPATH": str(head)}, "app.main:app", standard_stack),
            "unbatched": (ROOT, {**env, "DISTILL_PREDICT_MAX_BATCH": "1"}, "app.main:app", standard_stack),
            "batched": (ROOT, {**env, "DISTILL_PREDICT_MAX_BATCH": "64", "DISTILL_PREDICT_MAX_WAIT_MS": "2"},
                        "app.main:app", standard_stack),
            "bare": (scratch / "bare", env, "bare_app:app", standard_stack),
        }
        runs: dict[str, list[dict]] = {name: [] for name in args.variants}
        for repeat in range(args.repeats):  # interleaved, so a change in the machine's load hits every variant
            for name in args.variants:
                cwd, variant_env, app, server = variants[name]
                r = run_variant(name, cwd, variant_env, app, server, scratch, key, model_id, rows, args.clients,
                                args.seconds)
                runs[name].append(r)
                print(f"  [{repeat + 1}/{args.repeats}] {name}: {r['rps']:.0f} req/s, p50 {r['p50']:.1f} ms, "
                      f"p99 {r['p99']:.1f} ms, server CPU {r['cpu_us']:.0f} us/request "
                      f"({r['n']} requests, {r['errors']} errors)", flush=True)
        # per variant, the run with the median throughput
        results = {name: sorted(rs, key=lambda r: r["rps"])[len(rs) // 2] for name, rs in runs.items()}
        base = results.get("HEAD", {}).get("rps")
        print(f"\n/predict, MLP 8->{'->'.join(map(str, args.hidden))}->3, {args.clients} concurrent single-row clients, {args.seconds:g} s each, "
              f"{os.cpu_count()} CPUs")
        print(f"{'variant':<11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} {'errors':>7} {'x HEAD':>7}")
        for name, r in results.items():
            ratio = f"{r['rps'] / base:.2f}" if base else "-"
            print(f"{name:<11} {r['rps']:>8.0f} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['cpu_us']:>11.0f} "
                  f"{r['errors']:>7} {ratio:>7}")
        print(f"(machine load average over the last minute at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        if base and "batched" in results:
            r = results["batched"]
            print(f"goal: batched >= 3x HEAD's req/s ({r['rps'] / base:.2f}x) and p99 <= 100 ms ({r['p99']:.0f} ms)")
            _summary.record(f"/predict req/s at {args.clients} clients", f"{r['rps']:.0f} req/s",
                            f"HEAD {args.baseline_rev} {base:.0f} req/s", r["rps"] / base, ">= 3x baseline",
                            r["rps"] / base >= 3)
            _summary.record(f"/predict p99 at {args.clients} clients", f"{r['p99']:.0f} ms",
                            f"HEAD {args.baseline_rev} {results['HEAD']['p99']:.0f} ms", r["p99"] / results["HEAD"]["p99"],
                            "<= 100 ms", r["p99"] <= 100)
    finally:
        if args.keep:
            print(f"scratch folder: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
