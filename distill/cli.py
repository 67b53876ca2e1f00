"""``distill run SPEC.json --out DIR``: run a job spec of any task locally, with no service around it.

The remote commands (``distill files|jobs|models ...``) talk to a running service through the
Python client (``pip install ./client``: package ``distill_client``), imported only when one of
them is used, so the engine stays importable without it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import DistillError
from .spec import JobSpec
from .train import run_distillation

DEFAULT_CHECKPOINT_INTERVAL_S = 60.0  # the service's default (DISTILL_CHECKPOINT_INTERVAL_S)
REMOTE_COMMANDS = {"files": "upload and manage datasets and models on a service",
                   "jobs": "submit, follow, list and cancel jobs on a service",
                   "models": "list, download and try the service's models"}


def _remote(argv: list[str]) -> int:
    """Hand ``distill files|jobs|models ...`` to the client package's CLI."""
    try:
        from distill_client.cli import main as remote_main
    except ImportError:
        # A source checkout: the client lives next to the engine, in client/.
        checkout = Path(__file__).resolve().parents[1] / "client"
        if not (checkout / "distill_client").is_dir():
            print("error: the remote commands need the client: pip install distill-client (./client)",
                  file=sys.stderr)
            return 2
        sys.path.append(str(checkout))
        from distill_client.cli import main as remote_main
    return remote_main(argv, prog="distill")


def _format(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _print_event(kind: str, data: dict) -> None:
    if kind == "stage":
        extra = " ".join(f"{k}={v}" for k, v in data.items() if k != "stage")
        print(f"[stage] {data['stage']}" + (f" {extra}" if extra else ""), flush=True)
    elif kind == "epoch":
        # Every task's record has train_loss and validation_loss; the rest is the task's own.
        fields = " ".join(f"{k}={_format(v)}" for k, v in data.items() if k not in ("epoch", "step") and v is not None)
        print(f"[epoch {data['epoch']}] {fields}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in REMOTE_COMMANDS:
        return _remote(argv)
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, summary in REMOTE_COMMANDS.items():  # listed in --help; handled by _remote above
        commands.add_parser(name, help=summary + f" (distill {name} --help)", add_help=False)
    run = commands.add_parser("run", help="run a distillation job spec (JSON) locally")
    run.add_argument("spec", type=Path, help="job spec JSON; file paths are relative to it")
    run.add_argument("--out", type=Path, required=True, help="output folder (checkpoints/, final/)")
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda:N")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    run.add_argument("--checkpoint-interval", type=float, default=DEFAULT_CHECKPOINT_INTERVAL_S, metavar="SECONDS",
                     help="write a step checkpoint at most this often (default %(default)s; 0 = every step)")
    run.add_argument("--quiet", action="store_true", help="print only the final evaluation")
    args = parser.parse_args(argv)
    if args.checkpoint_interval < 0:
        parser.error("--checkpoint-interval must be >= 0")

    try:
        raw = json.loads(args.spec.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read {args.spec}: {exc}", file=sys.stderr)
        return 2
    try:
        spec = JobSpec.from_dict(raw, base_dir=args.spec.parent)
        result = run_distillation(spec, args.out, on_event=None if args.quiet else _print_event,
                                  device=args.device, resume=args.resume,
                                  checkpoint_interval_s=args.checkpoint_interval)
    except DistillError as exc:
        print(f"error [{exc.code}]{f' ({exc.param})' if exc.param else ''}: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps({"model": str(result.model_path), "evaluation": result.evaluation}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
