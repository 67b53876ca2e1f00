"""The main job, end to end on one machine: the service on its embedded defaults plus
a sample distillation.

1. Train a teacher MLP on scikit-learn's bundled digits (8x8 images, 10 classes) in a
   few seconds and export it in the model file format.
2. Migrate the database, start the API (uvicorn) and a Celery worker beside it, and
   create an API key for a tenant "demo" (what `distill-admin keys create` does).
3. Over HTTP, with that key: upload the teacher, the *unlabeled* training images (the transfer set)
   and a labeled held-out split; submit a job for a student with under 5% of the
   teacher's parameters; print progress while it runs; print the evaluation table and
   a few predictions.

With no DISTILL_* variables set this uses SQLite, ./var/artifacts and Celery's
filesystem broker; point DISTILL_DATABASE_URL / DISTILL_BROKER_URL at PostgreSQL and
Redis and the same code runs against them. Exits non-zero if the student keeps less
than 95% of the teacher's accuracy or is not under 5% of its size.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from app.admin import create_api_key
from distill.models import export_mlp

ROOT = Path(__file__).resolve().parents[1]
TEACHER_HIDDEN = [256, 256]
STUDENT_HIDDEN = [32]


def prepare(folder: Path) -> tuple[Path, Path, Path, np.ndarray, np.ndarray]:
    """Teacher + data files. Pixels are scaled to [0, 1] (digits are 0..16)."""
    folder.mkdir(parents=True, exist_ok=True)
    features, labels = load_digits(return_X_y=True)
    features = features / 16.0
    x_train, x_val, y_train, y_val = train_test_split(features, labels, test_size=0.2, random_state=0, stratify=labels)
    torch.manual_seed(0)
    widths = [64, *TEACHER_HIDDEN]
    layers = [m for a, b in zip(widths[:-1], widths[1:]) for m in (torch.nn.Linear(a, b), torch.nn.ReLU())]
    teacher = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], 10))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    x, y = torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train)
    started = time.perf_counter()
    for _ in range(40):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(teacher(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (teacher(torch.tensor(x_val, dtype=torch.float32)).argmax(-1).numpy() == y_val).mean()
    params = sum(p.numel() for p in teacher.parameters())
    print(f"teacher: MLP 64-{'-'.join(map(str, TEACHER_HIDDEN))}-10, {params:,} parameters, trained in "
          f"{time.perf_counter() - started:.1f}s, held-out accuracy {accuracy:.4f}")
    teacher_path = folder / "teacher.safetensors"
    export_mlp(teacher, teacher_path)
    header = ",".join(f"pixel{i}" for i in range(64))
    train_path, val_path = folder / "digits_train_unlabeled.csv", folder / "digits_validation.csv"
    np.savetxt(train_path, x_train, delimiter=",", header=header, comments="", fmt="%.4f")
    np.savetxt(val_path, np.c_[x_val, y_val], delimiter=",", header=header + ",label", comments="",
               fmt=["%.4f"] * 64 + ["%d"])
    return teacher_path, train_path, val_path, x_val, y_val


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(port: int, logs: Path) -> list[subprocess.Popen]:
    subprocess.run([sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
                   check=True, capture_output=True)
    logs.mkdir(parents=True, exist_ok=True)
    commands = {
        "api": [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        "worker": [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO"],
    }
    processes = []
    for name, command in commands.items():
        log = open(logs / f"{name}.log", "ab")
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise SystemExit(f"a service process exited; see {logs}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return processes
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the API did not come up; see {logs}")


def upload(http: httpx.Client, path: Path, purpose: str) -> dict:
    with open(path, "rb") as handle:
        response = http.post("/files", files={"file": (path.name, handle)}, data={"purpose": purpose})
    if response.status_code != 201:
        raise SystemExit(f"upload of {path.name} refused: {response.text}")
    return response.json()


def follow(http: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    """Poll the job and print its new events as they arrive."""
    after, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Status first, events second: a job's final event is written with its final status,
        # so events read after a finished status include it.
        job = http.get(f"/distillation/jobs/{job_id}").json()
        page = http.get(f"/distillation/jobs/{job_id}/events", params={"after": after} if after else {}).json()
        for event in page["data"]:
            after = event["id"]
            data = event["data"]
            if event["type"] == "metrics" and (data["epoch"] % 10 == 0 or data["epoch"] == 1):
                print(f"  epoch {data['epoch']:3d}  train_loss {data['train_loss']:.4f}  "
                      f"val_accuracy {data['validation_accuracy']:.4f}  agreement {data['validation_agreement']:.4f}")
            elif event["type"] == "stage":
                print(f"  [{data['stage']}]")
        if job["status"] in ("succeeded", "failed", "cancelled") and not page["has_more"]:
            return job
        time.sleep(0.5)
    raise SystemExit(f"job {job_id} did not finish in {timeout}s")


def print_evaluation(model: dict) -> None:
    e = model["evaluation"]
    t, s = e["teacher"], e["student"]
    print(f"\n{'':24}{'teacher':>14}{'student':>14}")
    print(f"{'parameters':24}{t['parameters']:>14,}{s['parameters']:>14,}")
    print(f"{'validation accuracy':24}{t['accuracy']:>14.4f}{s['accuracy']:>14.4f}")
    print(f"{'latency ms/sample (b=1)':24}{t['latency_ms_per_sample']:>14.4f}{s['latency_ms_per_sample']:>14.4f}")
    print(f"{'throughput samples/s':24}{t['throughput_samples_per_s']:>14,.0f}{s['throughput_samples_per_s']:>14,.0f}")
    print(f"\nparameter ratio {e['parameter_ratio']:.4f} | accuracy retained {e['accuracy_retention']:.4f} | "
          f"agreement {e['agreement']:.4f} | KL(teacher||student) {e['kl_teacher_student']:.4f} | "
          f"speedup {e['speedup']:.2f}x on {e['device']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("var/demo"), help="where sample files and logs go")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()

    teacher_path, train_path, val_path, x_val, y_val = prepare(args.workdir)
    port = free_port()
    processes = start_service(port, args.workdir / "logs")
    print(f"service up at http://127.0.0.1:{port} (API docs at /docs); logs in {args.workdir / 'logs'}")
    try:
        key_id, api_key = create_api_key("demo")  # the database is migrated by now
        print(f"API key {key_id} for tenant 'demo' (distill-admin keys list / revoke)")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=60,
                          headers={"Authorization": f"Bearer {api_key}"}) as http:
            teacher = upload(http, teacher_path, "model")
            training = upload(http, train_path, "dataset")
            validation = upload(http, val_path, "dataset")
            print(f"uploaded teacher {teacher['id']}, {training['details']['rows']} unlabeled training images, "
                  f"{validation['details']['rows']} labeled validation images")
            spec = {"task": "classification", "teacher": {"file_id": teacher["id"]},
                    "student": {"architecture": {"kind": "mlp", "hidden_dims": STUDENT_HIDDEN}},
                    "training_file": training["id"], "validation_file": validation["id"],
                    "hyperparameters": {"epochs": args.epochs, "batch_size": 64, "learning_rate": 0.005,
                                        "temperature": 4.0, "alpha": 0.5, "seed": 0}}
            response = http.post("/distillation/jobs", json=spec)
            if response.status_code != 201:
                print(f"the service refused the job: {response.text}")
                return 1
            job = response.json()
            print(f"submitted {job['id']}")
            job = follow(http, job["id"])
            if job["status"] != "succeeded":
                print(f"job {job['status']}: {job['error']}")
                return 1
            model = http.get(f"/models/{job['result_model_id']}").json()
            print_evaluation(model)
            sample = x_val[:8]
            predictions = http.post(f"/models/{model['id']}/predict", json={"inputs": sample.tolist()}).json()
            print(f"\npredict {model['id']} on 8 validation images:")
            print("  predicted:", [p["label"] for p in predictions["predictions"]])
            print("  actual:   ", [int(v) for v in y_val[:8]])
            print(f"download: GET /v1/models/{model['id']}/download")
            e = model["evaluation"]
            ok = e["accuracy_retention"] >= 0.95 and e["parameter_ratio"] < 0.05
            print("\nOK: student keeps >= 95% of the teacher's accuracy with < 5% of its parameters" if ok else
                  "\nFAILED: the student missed the 95% accuracy / 5% size target")
            return 0 if ok else 1
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    os.chdir(Path.cwd())
    sys.exit(main())
