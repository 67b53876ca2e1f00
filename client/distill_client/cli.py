"""The remote half of the ``distill`` command (also ``python -m distill_client``):

    distill files upload PATH --purpose dataset|model      distill files list|get|delete|content
    distill jobs create SPEC.json [--follow]               distill jobs list|get|cancel|follow|wait|estimate
    distill jobs events ID [--follow]
    distill models list|get|download|predict|delete

The server and key come from ``--base-url``/``--api-key`` or DISTILL_BASE_URL/DISTILL_API_KEY.
``--json`` prints one JSON document (``jobs events --follow --json``: one event per line) for
scripts. ``jobs create --follow`` shows a progress bar (step of total, ETA) with the live train
and validation loss, then the evaluation table; it exits 1 when the job fails or is cancelled.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from ._client import Distill
from ._errors import APIError, DistillError
from .types import Job, JobEvent

POLL_S = 2.0  # between events, the job's step counter is refreshed this often
BAR_WIDTH = 24


# ---- formatting --------------------------------------------------------------------------------------------

def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _age(created_at: int | None) -> str:
    if not created_at:
        return "-"
    seconds = max(0, int(time.time() - created_at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def table(rows: list[list[str]], header: list[str]) -> str:
    cells = [header, *rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in cells)


def evaluation_table(evaluation: dict) -> str:
    """Teacher vs student, metric by metric, then the comparison figures (agreement, speedup, ...)."""
    teacher, student = evaluation.get("teacher"), evaluation.get("student")
    lines = []
    if isinstance(teacher, dict) or isinstance(student, dict):
        teacher, student = teacher if isinstance(teacher, dict) else {}, student if isinstance(student, dict) else {}
        keys = [k for k in dict.fromkeys([*teacher, *student])
                if not isinstance(teacher.get(k), (dict, list)) and not isinstance(student.get(k), (dict, list))]
        lines.append(table([[k, _num(teacher.get(k)), _num(student.get(k))] for k in keys],
                           ["metric", "teacher", "student"]))
    rest = {k: v for k, v in evaluation.items()
            if k not in ("teacher", "student") and not isinstance(v, (dict, list))}
    if rest:
        lines.append(table([[k, _num(v)] for k, v in rest.items()], ["comparison", "value"]))
    return "\n\n".join(lines) if lines else "(no evaluation)"


def _error_text(job: Job) -> str:
    if job.error is None:
        return f"job {job.id} {job.status}"
    where = f" ({job.error.param})" if job.error.param else ""
    return f"job {job.id} {job.status}: [{job.error.code}]{where} {job.error.message}"


class ProgressView:
    """``step 24/96 [######------------------]  25% ETA 0:03  epoch 2/8  train_loss 0.41  validation_loss 0.39``,
    redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self, out: TextIO, epochs: int | None) -> None:
        self.out, self.epochs = out, epochs
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.step = self.total = self.epoch = 0
        self.losses: dict[str, float] = {}
        self._origin: tuple[float, int] | None = None  # (time, step) when training was first seen moving
        self._key: tuple | None = None
        self._open = False

    def update(self, step: int | None = None, total: int | None = None, epoch: int | None = None,
               **losses: Any) -> None:
        if total:
            self.total = int(total)
        if step is not None and step >= self.step:
            if self._origin is None or step < self._origin[1]:
                self._origin = (time.monotonic(), int(step))
            self.step = int(step)
        if epoch:
            self.epoch = int(epoch)
        self.losses.update({k: v for k, v in losses.items() if isinstance(v, (int, float))})
        self._render()

    def eta(self) -> float | None:
        if self._origin is None or not self.total or self.step <= self._origin[1]:
            return 0.0 if self.total and self.step >= self.total else None
        rate = (self.step - self._origin[1]) / max(time.monotonic() - self._origin[0], 1e-6)
        return (self.total - self.step) / rate

    def line(self) -> str:
        if self.total:
            filled = round(BAR_WIDTH * min(self.step / self.total, 1.0))
            head = f"step {self.step}/{self.total} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] " \
                   f"{100 * self.step // self.total:3d}% ETA {_duration(self.eta())}"
        else:
            head = f"step {self.step}"
        if self.epoch:
            head += f"  epoch {self.epoch}" + (f"/{self.epochs}" if self.epochs else "")
        return head + "".join(f"  {k} {_num(v)}" for k, v in self.losses.items())

    def _render(self) -> None:
        key = (self.step, self.total, self.epoch, tuple(self.losses.items()))
        if self.tty:
            self.out.write("\r\033[K" + self.line())
            self._open = True
        elif key != self._key:  # a log: a line per change, not per poll
            self.out.write(self.line() + "\n")
        self._key = key
        self.out.flush()

    def say(self, text: str) -> None:
        """A line of its own (a stage change), without breaking the bar."""
        if self._open:
            self.out.write("\n")
            self._open = False
        self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self._open:
            self.out.write("\n")
            self._open = False


# ---- follow ------------------------------------------------------------------------------------------------

def follow(client: Distill, job_id: str, out: TextIO, as_json: bool = False) -> int:
    """Watch a job to its end: progress, losses, stages, then the evaluation. 0 when it succeeded."""
    job = client.jobs.retrieve(job_id)
    epochs = (job.spec.get("hyperparameters") or {}).get("epochs")
    view = ProgressView(out, epochs if isinstance(epochs, int) else None)
    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            with client.jobs.events(job_id, stream=True) as stream:
                for event in stream:
                    inbox.put(("event", event))
            inbox.put(("end", None))
        except BaseException as exc:  # handed to the main thread
            inbox.put(("error", exc))

    threading.Thread(target=read, name=f"events-{job_id}", daemon=True).start()
    evaluation: dict | None = None
    while True:
        try:
            kind, item = inbox.get(timeout=POLL_S)
        except queue.Empty:
            job = client.jobs.retrieve(job_id)
            if not as_json and job.status == "running" and job.progress.total_steps:
                view.update(job.progress.step, job.progress.total_steps, job.progress.epoch)
            continue
        if kind == "error":
            raise item
        if kind == "end":
            break
        event: JobEvent = item
        if as_json:
            if event.type == "evaluation":
                evaluation = event.data
            continue
        data = event.data
        if event.type == "stage":
            extra = " ".join(f"{k}={v}" for k, v in data.items() if k != "stage")
            view.say(f"[stage] {data.get('stage')}" + (f" {extra}" if extra else ""))
        elif event.type in ("metrics", "epoch"):
            progress = client.jobs.retrieve(job_id).progress
            losses = {k: data.get(k) for k in ("train_loss", "validation_loss") if data.get(k) is not None}
            view.update(data.get("step", progress.step), progress.total_steps, data.get("epoch"), **losses)
        elif event.type == "progress":
            view.update(data.get("step"), data.get("total_steps"), data.get("epoch"))
        elif event.type == "evaluation":
            evaluation = data
        else:
            view.say(f"[{event.type}] {event.message}")
    view.done()
    job = client.jobs.retrieve(job_id)
    if as_json:
        out.write(json.dumps({**job.to_dict(), "evaluation": evaluation}, indent=2) + "\n")
    elif job.status == "succeeded":
        if evaluation is None and job.result_model_id:
            evaluation = client.models.retrieve(job.result_model_id).evaluation
        out.write("\nevaluation\n" + evaluation_table(evaluation or {}) + "\n\n")
        out.write(f"model: {job.result_model_id}  (distill models download {job.result_model_id})\n")
    out.flush()
    if job.status != "succeeded":
        print(f"error: {_error_text(job)}", file=sys.stderr)
        return 1
    return 0


# ---- commands ----------------------------------------------------------------------------------------------

def _emit(args, value: Any, human: str | None = None) -> None:
    if args.json or human is None:
        data = value.to_dict() if hasattr(value, "to_dict") else \
            [v.to_dict() for v in value] if isinstance(value, list) else value
        print(json.dumps(data, indent=2))
    else:
        print(human)


def _take(iterable, limit: int | None) -> list:
    items = []
    for item in iterable:
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


def _cmd_files(client: Distill, args) -> int:
    if args.action == "upload":
        record = client.files.create(file=args.path, purpose=args.purpose)
        _emit(args, record, f"{record.id}  {record.filename}  {record.bytes:,} bytes  purpose={record.purpose}")
    elif args.action == "list":
        records = _take(client.files.list(purpose=args.purpose), args.limit)
        _emit(args, records, table([[f.id, f.purpose, f.filename, f"{f.bytes:,}", _age(f.created_at)]
                                    for f in records], ["id", "purpose", "filename", "bytes", "created"]))
    elif args.action == "get":
        _emit(args, client.files.retrieve(args.id))
    elif args.action == "delete":
        _emit(args, client.files.delete(args.id), f"deleted {args.id}")
    elif args.action == "content":
        content = client.files.content(args.id)
        if args.output:
            Path(args.output).write_bytes(content)
            _emit(args, {"id": args.id, "path": str(args.output), "bytes": len(content)}, str(args.output))
        else:
            sys.stdout.buffer.write(content)
    return 0


def _progress_text(job: Job) -> str:
    p = job.progress
    if job.status == "queued" and job.queue_position is not None:
        return f"queue #{job.queue_position}"
    return f"{p.step}/{p.total_steps}" if p.total_steps else "-"


def _cmd_jobs(client: Distill, args) -> int:
    if args.action == "create":
        try:
            text = sys.stdin.read() if str(args.spec) == "-" else Path(args.spec).read_text()
            body = json.loads(text)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: cannot read {args.spec}: {exc}", file=sys.stderr)
            return 2
        job = client.jobs.create(body)
        if args.follow:
            if not args.json:
                print(f"created {job.id} ({job.status}); following it (Ctrl-C stops following, not the job)",
                      flush=True)
            return _follow(client, job.id, args.json)
        _emit(args, job, f"{job.id}  {job.status}")
    elif args.action == "estimate":
        try:
            body = json.loads(sys.stdin.read() if str(args.spec) == "-" else Path(args.spec).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: cannot read {args.spec}: {exc}", file=sys.stderr)
            return 2
        estimate = client.jobs.estimate(body)
        _emit(args, estimate, table([[k, _num(v)] for k, v in estimate.to_dict().items()
                                     if not isinstance(v, (dict, list))], ["estimate", "value"]))
    elif args.action == "list":
        jobs = _take(client.jobs.list(status=args.status), args.limit)
        _emit(args, jobs, table([[j.id, j.status, _progress_text(j), j.result_model_id or "-", _age(j.created_at)]
                                 for j in jobs], ["id", "status", "progress", "model", "created"]))
    elif args.action == "get":
        _emit(args, client.jobs.retrieve(args.id))
    elif args.action == "follow":
        return _follow(client, args.id, args.json)
    elif args.action == "cancel":
        job = client.jobs.cancel(args.id)
        _emit(args, job, f"{job.id}  {job.status}" + (" (cancel requested)" if job.cancel_requested else ""))
    elif args.action == "wait":
        job = client.jobs.wait(args.id, timeout=args.timeout)
        _emit(args, job, f"{job.id}  {job.status}" + (f"  model {job.result_model_id}" if job.result_model_id else ""))
        if job.status != "succeeded":
            print(f"error: {_error_text(job)}", file=sys.stderr)
            return 1
    elif args.action == "events":
        if args.follow:
            with client.jobs.events(args.id, stream=True, after=args.after) as stream:
                for event in stream:
                    print(event.model_dump_json() if args.json else _event_line(event), flush=True)
        else:
            events = client.jobs.events(args.id, after=args.after)
            _emit(args, events, "\n".join(_event_line(e) for e in events))
    return 0


def _event_line(event: JobEvent) -> str:
    when = datetime.fromtimestamp(event.created_at, timezone.utc).strftime("%H:%M:%S") if event.created_at else ""
    return f"{event.id:>6}  {when}  {event.type:<10} {event.message}"


def _follow(client: Distill, job_id: str, as_json: bool) -> int:
    try:
        return follow(client, job_id, sys.stdout, as_json)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (distill jobs cancel {job_id} stops it)", file=sys.stderr)
        return 130


def _cmd_models(client: Distill, args) -> int:
    if args.action == "list":
        models = _take(client.models.list(), args.limit)
        _emit(args, models, table([[m.id, m.task, m.kind, f"{m.parameters:,}", f"{m.size_bytes:,}", m.job_id or "-",
                                    _age(m.created_at)] for m in models],
                                  ["id", "task", "kind", "parameters", "bytes", "job", "created"]))
    elif args.action == "get":
        model = client.models.retrieve(args.id)
        _emit(args, model, None if args.json else model.to_json() + "\n\nevaluation\n"
              + evaluation_table(model.evaluation))
    elif args.action == "delete":
        _emit(args, client.models.delete(args.id), f"deleted {args.id}")
    elif args.action == "download":
        path = client.models.download(args.id, args.output, format=args.format)
        _emit(args, {"id": args.id, "path": str(path), "bytes": path.stat().st_size}, str(path))
    elif args.action == "predict":
        raw = args.inputs
        try:
            inputs = json.loads(Path(raw[1:]).read_text() if raw.startswith("@") else raw)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: INPUTS must be JSON (a list of rows or texts) or @file.json: {exc}", file=sys.stderr)
            return 2
        result = client.models.predict(args.id, inputs)
        _emit(args, result, table([[str(i), str(p.label), " ".join(f"{x:.3f}" for x in p.probabilities)]
                                   for i, p in enumerate(result.predictions)], ["row", "label", "probabilities"]))
    return 0


def build_parser(prog: str = "distill") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable JSON output")
    common.add_argument("--base-url", help="the server (default: DISTILL_BASE_URL or http://localhost:8000)")
    common.add_argument("--api-key", help="the API key (default: DISTILL_API_KEY)")
    common.add_argument("--max-retries", type=int, default=2, help="retries on 429/5xx/connection errors")

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="group", required=True)

    files = groups.add_parser("files", help="upload and manage datasets and models").add_subparsers(
        dest="action", required=True)
    p = files.add_parser("upload", parents=[common], help="upload a dataset (CSV/JSONL) or a model")
    p.add_argument("path", type=Path)
    p.add_argument("--purpose", choices=["dataset", "model"], required=True)
    p = files.add_parser("list", parents=[common], help="list files, newest first")
    p.add_argument("--purpose", choices=["dataset", "model"])
    p.add_argument("--limit", type=int, default=20, help="at most this many (default %(default)s)")
    for name in ("get", "delete"):
        files.add_parser(name, parents=[common]).add_argument("id")
    p = files.add_parser("content", parents=[common], help="download a file's bytes")
    p.add_argument("id")
    p.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")

    jobs = groups.add_parser("jobs", help="submit and watch distillation jobs").add_subparsers(
        dest="action", required=True)
    p = jobs.add_parser("create", parents=[common], help="submit a job (the API's JSON body; - for stdin)")
    p.add_argument("spec")
    p.add_argument("--follow", "-f", action="store_true", help="show progress and losses until it ends")
    p = jobs.add_parser("estimate", parents=[common], help="what a job would cost (steps, FLOPs, duration)")
    p.add_argument("spec")
    p = jobs.add_parser("list", parents=[common], help="list jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20, help="at most this many (default %(default)s)")
    for name in ("get", "cancel"):
        jobs.add_parser(name, parents=[common]).add_argument("id")
    p = jobs.add_parser("follow", parents=[common], help="progress and losses of a job until it ends, as --follow")
    p.add_argument("id")
    p = jobs.add_parser("wait", parents=[common], help="wait until the job ends (exit 1 unless it succeeded)")
    p.add_argument("id")
    p.add_argument("--timeout", type=float)
    p = jobs.add_parser("events", parents=[common], help="a job's events (--follow: live, until it ends)")
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--after", type=int, help="only events newer than this id")

    models = groups.add_parser("models", help="finished students").add_subparsers(dest="action", required=True)
    p = models.add_parser("list", parents=[common])
    p.add_argument("--limit", type=int, default=20)
    for name in ("get", "delete"):
        models.add_parser(name, parents=[common]).add_argument("id")
    p = models.add_parser("download", parents=[common], help="save a model (.safetensors, or .tar.gz for HF)")
    p.add_argument("id")
    p.add_argument("-o", "--output", default=".", help="a file or a folder (default: the current folder)")
    p.add_argument("--format", choices=["model", "adapter"], default="model")
    p = models.add_parser("predict", parents=[common], help="classify rows or texts")
    p.add_argument("id")
    p.add_argument("inputs", help='JSON: [[0.1, 2.3, ...], ...] or ["a text", ...]; or @file.json')
    return parser


COMMANDS = {"files": _cmd_files, "jobs": _cmd_jobs, "models": _cmd_models}


def main(argv: list[str] | None = None, prog: str = "distill") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        with Distill(api_key=args.api_key, base_url=args.base_url, max_retries=args.max_retries) as client:
            return COMMANDS[args.group](client, args)
    except APIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
