"""The four paths of the LM KD loss (distill/losses/chunked.py), forward + backward: time and peak memory.

``lm_loss(student_head, student_hidden, targets, teacher, ..., path=P)`` for every path P in
materialized, chunked, checkpointed, fused (the module docstring of chunked.py describes each),
against each form the teacher side takes in training:

  online      (teacher_head, teacher_hidden): the teacher's head runs inside the loss
  full fp16   a float16 (N, V) logits tensor: the cached full-vocabulary signal of the store
  top-64      a TopKSignal from ``teacher_topk(logits, 64, T)``: the compressed signal

Setup (every variant the same): N = 1,008 positions (16 rows × 63 next-token positions), hidden
size H = 256, student and teacher heads ``nn.Linear(H, V, bias=False)`` (seed 0), V from
``--vocab``, forward KL at T = 1, kd_weight 1, ce_weight 0 (``--ce``: 0.5 / 0.5), float32,
``--threads`` torch threads. One step is ``lm_loss(...)`` then ``out.total.backward()`` (the
gradients of the student's hidden states and head weight).

Each (vocab, teacher, path) runs in two FRESH subprocesses, as in bench_loss_memory.py and
bench_vs_trl.py: a timing one with the default allocator (median of ``--repeats`` steps after
one warm-up step, wall clock), and a memory one with ``MALLOC_MMAP_THRESHOLD_=65536`` (every
tensor its own mapping, so the RSS follows live tensors, not glibc heap fragmentation; see
bench_loss_memory.py), where the figure is the growth of ``ru_maxrss`` during one step over the
RSS after the inputs are allocated and a tiny warm-up call has run. The inputs (heads, hidden
states, the teacher signal) are not counted; the head-weight gradient (V × H) is, in every row.
The teacher signals are built a block of rows at a time, so no (N, V) float32 tensor sets the
high-water mark before the step. Variants run interleaved (``--rounds`` > 1 repeats the whole
sweep; the table then shows medians over rounds).

Prints one table per vocabulary with the ratios against the materialized path of the same
teacher form (> 1 = faster / less memory) and records, through _summary.py, one row per
vocabulary and teacher form: fused vs materialized.

Run:  .venv/bin/python benchmarks/bench_loss_paths.py [--vocab 8192 32000] [--repeats 5] [--threads 1]
      48 fresh processes at the defaults: 526 s of CPU time (14 min wall on a 2-core machine shared with
      other jobs), so expect several minutes even on a quiet one; --vocab 8192 --repeats 2 is a quick look.
      --ce adds cross-entropy; --help for the rest.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _summary  # noqa: E402

TEACHERS = ("online", "full fp16", "top-64")
PATHS = ("materialized", "chunked", "checkpointed", "fused")
ROWS, SEQ, HIDDEN, TOP_K, BLOCK = 16, 63, 256, 64, 64


# --------------------------------------------------------------------------- worker (one variant, own process)

def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _inputs(torch, teacher_head, vocab: int, n: int, form: str, seed: int):
    """Student hidden (N, H) leaf needing grad, targets (N,), and the teacher side in ``form``.
    Cached signals are filled into preallocated tensors BLOCK rows at a time (no (N, V) float32)."""
    from distill.losses import TopKSignal, teacher_topk

    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, HIDDEN, generator=gen).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    teacher_hidden = torch.randn(n, HIDDEN, generator=gen)
    if form == "online":
        return hidden, targets, (teacher_head, teacher_hidden)
    k = min(TOP_K, vocab)
    full = torch.empty(n, vocab, dtype=torch.float16) if form == "full fp16" else None
    top = (torch.empty(n, k), torch.empty(n, k, dtype=torch.long), torch.empty(n)) if full is None else None
    with torch.no_grad():
        for start in range(0, n, BLOCK):
            rows = slice(start, start + BLOCK)
            logits = teacher_head(teacher_hidden[rows])
            if full is not None:
                full[rows] = logits
            else:
                sig = teacher_topk(logits, k, 1.0)
                top[0][rows], top[1][rows], top[2][rows] = sig.logprobs, sig.indices, sig.tail_logprob
    return hidden, targets, (full if full is not None else TopKSignal(*top))


def worker(args) -> None:
    import torch
    from torch import nn

    from distill.losses import lm_loss

    torch.set_num_threads(args.threads)
    form, path = args.worker.split(":")
    torch.manual_seed(0)
    student_head = nn.Linear(HIDDEN, args.vocab, bias=False)
    teacher_head = nn.Linear(HIDDEN, args.vocab, bias=False).requires_grad_(False)
    kd_w, ce_w = (0.5, 0.5) if args.ce else (1.0, 0.0)

    def step(hidden, targets, teacher) -> float:
        student_head.weight.grad = hidden.grad = None
        out = lm_loss(student_head, hidden, targets, teacher, args.vocab, "forward_kl", 1.0, 0.0, kd_w, ce_w,
                      path=path)
        out.total.backward()
        return out.total.item()

    if args.measure == "memory":  # tiny warm-up: lazily loaded code is not counted as the loss's memory
        step(*_inputs(torch, teacher_head, args.vocab, 8, form, 1))
        student_head.weight.grad = None
    inputs = _inputs(torch, teacher_head, args.vocab, ROWS * SEQ, form, 2)
    if args.measure == "time":
        step(*inputs)  # warm: first-touch page faults, allocator caches
        times = []
        for _ in range(max(args.repeats, 1)):
            start = time.perf_counter()
            step(*inputs)
            times.append((time.perf_counter() - start) * 1e3)
        print(json.dumps({"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}))
        return
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    base = _rss_kib()
    loss = step(*inputs)
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # "<=": the step never rose above the high-water mark set before it: its peak is at most this.
    print(json.dumps({"mib": (maxrss_after - base) / 1024, "loss": loss,
                      "note": "<=" if maxrss_after <= maxrss_before else ""}))


# --------------------------------------------------------------------------- driver

def run_worker(args, vocab: int, form: str, path: str, measure: str) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{form}:{path}", "--measure", measure,
           "--vocab", str(vocab), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    cmd += ["--ce"] if args.ce else []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # RSS follows live tensors (module docstring)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(f"V={vocab} {form} {path} ({measure}): worker failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_vocab(args, vocab: int) -> dict:
    runs: dict[tuple[str, str], list[dict]] = {(t, p): [] for t in TEACHERS for p in PATHS}
    for _ in range(args.rounds):
        for form, path in runs:  # interleaved: drift on a shared machine spreads over every variant
            timed = run_worker(args, vocab, form, path, "time")
            memory = run_worker(args, vocab, form, path, "memory") if timed else None
            if timed and memory:
                runs[(form, path)].append({**timed, **memory})
    med = {}
    for key, results in runs.items():
        if results:
            med[key] = {name: statistics.median(r[name] for r in results) for name in ("ms", "mib", "loss")}
            med[key].update(min_ms=min(r["min_ms"] for r in results), max_ms=max(r["max_ms"] for r in results),
                            note="<=" if any(r["note"] for r in results) else "")
    return med


def print_table(vocab: int, med: dict) -> None:
    print(f"\nV = {vocab:,}")
    header = (f"{'teacher':<10} {'path':<13} {'ms/step':>8} {'(min-max)':>13} {'x mat.':>7} "
              f"{'peak MiB added':>15} {'x mat.':>7} {'loss':>12}")
    print(header)
    print("-" * len(header))
    for (form, path), r in med.items():
        base = med.get((form, "materialized"))
        t_ratio = f"{base['ms'] / r['ms']:.2f}" if base else "-"
        m_ratio = f"{base['mib'] / r['mib']:.2f}" if base and r["mib"] > 0 else "-"
        spread = f"({r['min_ms']:.0f}-{r['max_ms']:.0f})"
        print(f"{form:<10} {path:<13} {r['ms']:>8.0f} {spread:>13} {t_ratio:>7} "
              f"{r['note'] + format(r['mib'], '.1f'):>15} {m_ratio:>7} {r['loss']:>12.6g}")
    for form in TEACHERS:
        losses = [r["loss"] for (f, _), r in med.items() if f == form]
        if len(losses) > 1:
            spread = (max(losses) - min(losses)) / max(abs(statistics.fmean(losses)), 1e-30)
            print(f"  {form}: the paths' losses agree to {spread:.1e} relative")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32000])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per timing process (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per variant, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    parser.add_argument("--ce", action="store_true", help="kd_weight 0.5, ce_weight 0.5 (default 1 / 0)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["memory", "time"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.vocab = args.vocab[0]  # a worker measures one vocabulary
        worker(args)
        return

    print(f"lm_loss forward+backward: N={ROWS * SEQ} positions ({ROWS} rows x {SEQ}), H={HIDDEN}, forward KL T=1, "
          f"kd/ce weights {'0.5/0.5' if args.ce else '1/0'}, float32, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs; fresh processes per variant; ms = median of {args.repeats} steps; "
          "peak = ru_maxrss growth over the RSS after the inputs (MALLOC_MMAP_THRESHOLD_=65536); "
          "x mat. = materialized / this (> 1 = faster, less memory)")
    for vocab in args.vocab:
        med = bench_vocab(args, vocab)
        print_table(vocab, med)
        for form in TEACHERS:
            fused, mat = med.get((form, "fused")), med.get((form, "materialized"))
            if fused and mat:
                _summary.record(f"KD loss fwd+bwd, fused vs materialized, {form}, V={vocab}",
                                f"{fused['ms']:.0f} ms, +{fused['mib']:.0f} MiB",
                                f"materialized {mat['ms']:.0f} ms, +{mat['mib']:.0f} MiB", mat["ms"] / fused["ms"],
                                "faster, less memory", fused["ms"] < mat["ms"] and fused["mib"] < mat["mib"])
    print("\n<= : the step never rose above an earlier high-water mark (its peak is at most this)")


if __name__ == "__main__":
    main()
