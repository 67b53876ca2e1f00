"""Peak memory (and time) of the token-level KD loss, forward + backward, at LLM vocabulary size.

``distill.losses.token.token_kd_loss`` on (B, T, V) student logits, default B=4, T=256
(N = 1,024 positions), V = 32,000, forward KL at T=2, comparing:

  full            teacher logits (N, V), all positions at once
  topk64, topk8   a TopKSignal (N, k) (k+1 buckets: top-k + one tail bucket), all at once
  full/c128       teacher logits, chunk_size=128 (each chunk under activation checkpointing)
  topk64/c128     top-k 64, chunk_size=128
  topk8/c128      top-k 8, chunk_size=128

Each variant is measured in a FRESH subprocess, so one variant's allocations cannot hide
another's. On CPU the number is the growth of the process's peak RSS (``resource.getrusage``
ru_maxrss) over the RSS measured after the inputs are allocated (and after a tiny warm-up
call, so lazily loaded code is not counted); with ``--device cuda`` it is
``torch.cuda.max_memory_allocated()`` over ``memory_allocated()`` after the inputs. Either
way the column is what the loss ADDS on top of its inputs, and it includes the gradient of
the student logits (N × V, the same for every variant — printed as a reference line),
which a real training step materialises anyway.

glibc and RSS: by default glibc raises its mmap threshold (up to 32 MiB) after the first
large free, so freed mid-size tensors (a 128-row chunk at V=32k is 16 MiB) stay in the heap
and the RSS peak then depends on fragmentation rather than on live tensors (at the
defaults, chunked runs whose live peak is ~320 MiB measured anywhere from 220 to 740 MiB,
the worst above the unchunked run). The memory process therefore runs with
``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor is its own mapping, returned to the OS on
free, so RSS follows live tensor memory); ``--glibc-default`` turns that off. The times come
from a SECOND fresh process per variant with the default allocator (mmap-per-tensor makes
every step pay page faults, ~2x slower): median of ``--repeats`` steps after one warm step.

The inputs' own sizes (student logits + teacher signal) are printed separately: that is
where top-k saves most (a (N, V) teacher tensor vs (N, k) values + ids), while chunking is
what bounds the loss's own (N, V) float32 intermediates.

Run:  .venv/bin/python benchmarks/bench_loss_memory.py                       # ~1 min on 2 CPU cores
      .venv/bin/python benchmarks/bench_loss_memory.py --loss-type jsd --dtype bfloat16
      .venv/bin/python benchmarks/bench_loss_memory.py --device cuda --batch 8 --seq 2048 --vocab 128256
      .venv/bin/python benchmarks/bench_loss_memory.py --help
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ["full", "topk64", "topk8", "full/c128", "topk64/c128", "topk8/c128"]
MIB = 1024 * 1024


def parse_variant(name: str) -> tuple[int | None, int | None]:
    """'topk64/c128' -> (k=64, chunk=128); 'full' -> (None, None)."""
    teacher, _, chunk = name.partition("/")
    if teacher == "full":
        k = None
    elif teacher.startswith("topk") and teacher[4:].isdigit():
        k = int(teacher[4:])
    else:
        raise ValueError(f"bad variant {name!r}: use full or topk<K>, optionally /c<CHUNK>")
    if chunk and not (chunk.startswith("c") and chunk[1:].isdigit()):
        raise ValueError(f"bad variant {name!r}: the chunk part is c<CHUNK>, e.g. full/c128")
    return k, (int(chunk[1:]) if chunk else None)


# --------------------------------------------------------------------------- worker (one variant, own process)


def _rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _make_inputs(args, k, device, n_rows_total, torch, teacher_topk, TopKSignal):
    """Student logits (B, T, V) as a leaf that needs grad, the teacher signal, the mask.
    The top-k signal is built a block of rows at a time, so no (N, V) teacher tensor ever
    exists in that process (it would otherwise set the RSS high-water mark)."""
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = (torch.randn(shape, generator=gen) * 2.0).to(device=device, dtype=dtype).requires_grad_(True)
    if k is None:
        teacher = (torch.randn(shape, generator=gen) * 2.0).to(device=device, dtype=dtype)
    else:
        logprobs, indices, tails = [], [], []
        for _ in range(0, n_rows_total, 64):
            block = torch.randn(64, args.vocab, generator=gen) * 2.0
            sig = teacher_topk(block.to(device=device, dtype=dtype), k, args.temperature)
            logprobs.append(sig.logprobs)
            indices.append(sig.indices)
            tails.append(sig.tail_logprob)  # the exact tail mass, as the engine stores it
        teacher = TopKSignal(
            torch.cat(logprobs)[:n_rows_total].reshape(args.batch, args.seq, k),
            torch.cat(indices)[:n_rows_total].reshape(args.batch, args.seq, k),
            torch.cat(tails)[:n_rows_total].reshape(args.batch, args.seq),
        )
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool, device=device)
    pad = int(round(args.pad_fraction * args.seq))
    if pad:
        mask[:, args.seq - pad :] = False  # right padding
    return student, teacher, mask


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from distill.losses.token import TopKSignal, teacher_topk, token_kd_loss

    k, chunk = parse_variant(args.worker)
    timing = args.measure == "time"
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def step(student, teacher, mask):
        loss = token_kd_loss(student, teacher, mask, args.loss_type, args.temperature, args.beta, chunk_size=chunk)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    # Warm-up on a tiny input: loads lazily initialised code (autograd engine, kernels) so
    # that it is not counted as the loss's memory.
    tiny = argparse.Namespace(**{**vars(args), "batch": 1, "seq": 8})
    step(*_make_inputs(tiny, k, device, 8, torch, teacher_topk, TopKSignal))

    student, teacher, mask = _make_inputs(args, k, device, args.batch * args.seq, torch, teacher_topk, TopKSignal)
    if timing:
        step(student, teacher, mask)  # warm: first-touch page faults, allocator caches
        times = []
        for _ in range(max(args.repeats, 1)):
            student.grad = None
            start = time.perf_counter()
            step(student, teacher, mask)
            times.append((time.perf_counter() - start) * 1e3)
        print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}))
        return

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        base = _rss_now_kib()

    loss = step(student, teacher, mask)

    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated() - base) / MIB
        note = ""
    else:
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib = (maxrss_after - base) / 1024
        # If the loss never rose above the high-water mark set before it ran, the peak is
        # only known to be at most this.
        note = "<=" if maxrss_after <= maxrss_before else ""

    print(json.dumps({"variant": args.worker, "loss": loss, "peak_mib": peak_mib, "note": note}))


# --------------------------------------------------------------------------- driver


def run_worker(args, variant: str, measure: str) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--measure", measure]
    for name in ("batch", "seq", "vocab", "loss_type", "temperature", "beta", "dtype", "pad_fraction",
                 "repeats", "device", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if measure == "memory" and not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(f"{variant} ({measure}): worker failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--loss-type", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd", "tvd"])
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--beta", type=float, default=0.5, help="jsd only")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the student and (full) teacher logits")
    parser.add_argument("--pad-fraction", type=float, default=0.0,
                        help="fraction of each sequence masked out (right padding); >0 adds the masked-selection copy")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help="full | topk<K>, optionally /c<CHUNK>, e.g. topk16/c256")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm step)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="measure CPU memory with glibc's default (dynamic) mmap threshold; see the docstring")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0 = torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["memory", "time"], default="memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for v in args.variants:
        parse_variant(v)

    if args.worker:
        worker(args)
        return

    import torch  # only for sizes / environment in the header

    n = args.batch * args.seq
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    student_mib = n * args.vocab * elem / MIB
    print(f"token_kd_loss forward+backward: B={args.batch} T={args.seq} (N={n} positions) V={args.vocab:,} "
          f"{args.loss_type} T={args.temperature}" + (f" beta={args.beta}" if args.loss_type == "jsd" else "")
          + f", {args.dtype} logits, pad fraction {args.pad_fraction}")
    print(f"device {args.device}; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; each variant in fresh processes; time = median of {args.repeats} steps")
    print()
    print("Inputs (not counted below):")
    print(f"  student logits (N, V) {args.dtype:<9}  {student_mib:9.1f} MiB")
    print(f"  teacher logits (N, V) {args.dtype:<9}  {student_mib:9.1f} MiB   (full variants)")
    for k in sorted({parse_variant(v)[0] for v in args.variants} - {None}, reverse=True):
        print(f"  top-k {k:<4} (N, k) f32 + i64 + (N,) f32 tail  {(n * k * 12 + n * 4) / MIB:9.3f} MiB   "
              f"(topk{k} variants)")
    print(f"  reference: the student-logit gradient alone is (N, V) {args.dtype} = {student_mib:.1f} MiB, "
          "included in every row")
    print()

    rows = []
    for variant in args.variants:
        memory = run_worker(args, variant, "memory")
        timing = run_worker(args, variant, "time")
        if memory is not None and timing is not None:
            rows.append({**memory, **timing})

    full = next((r for r in rows if r["variant"] == "full"), None)
    header = f"{'variant':<13} {'peak MiB above inputs':>22} {'x full':>7} {'time ms':>9} {'(min-max)':>15} {'loss':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['peak_mib'] / full['peak_mib']:.2f}" if full and full["peak_mib"] > 0 else "-"
        peak = f"{r['note']}{r['peak_mib']:.1f}"
        spread = f"({r['min_ms']:.0f}-{r['max_ms']:.0f})"
        print(f"{r['variant']:<13} {peak:>22} {ratio:>7} {r['median_ms']:>9.0f} {spread:>15} {r['loss']:>10.5f}")
    print()
    if args.device.startswith("cuda"):
        print("peak = torch.cuda.max_memory_allocated() - memory_allocated() after the inputs")
    else:
        print("peak = ru_maxrss after the step - RSS after the inputs (<= : never rose above an earlier high-water "
              "mark), " + ("glibc default malloc" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=65536"))
    print("topk losses differ from full by design (k+1 buckets); each /c<CHUNK> row should equal its unchunked one.")


if __name__ == "__main__":
    main()
