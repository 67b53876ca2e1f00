"""The engine's causal-LM KD training loop vs. a hand-written one: tokens/s and peak memory.

Same teacher (a random-init GPT-2), same student (its half-depth derivation, DistilBERT
style: ``distill.hf.derive_student``), same random token rows in the same order, same batch
size, sequence length, steps, loss and optimizer:

  hand            the loop people usually write (TRL GKD / torchtune KD recipe style):
                  ``student(input_ids).logits`` (B, L, V), the teacher's (B, L, V) logits under
                  ``no_grad`` on every batch, forward KL via log_softmax over the full vocabulary
                  at every position, masked mean, plus the next-token cross-entropy.
  engine          ``distill.text_train.train_causal_lm``, the engine's own loop, called with
                  prepared tokens: models run to their last hidden states, and the output heads
                  of both models are applied to 512 positions at a time inside activation
                  checkpoints (``chunked_lm_loss``), so no (B, L, V) tensor ever exists.
  engine top-k    the same loop on a precomputed top-k teacher signal
                  (``distill.text_train.precompute_topk``): the teacher runs once over the data
                  before training (its time is shown separately: a real job reuses it every epoch).

Loss for all: ``alpha * T² * KL(teacher ‖ student) + (1 - alpha) * CE`` with alpha 0.5, T 1,
summed over the positions that count and divided by their number; AdamW (no weight
decay), constant learning rate, gradients clipped to norm 1; dropout off, so the first two
rows do the same arithmetic and their mean losses agree (top-k differs by design).

Each variant runs in FRESH subprocesses. tokens/s counts input tokens (batch × seq_len) over
the steps after ``--warmup`` (timed from the end of the last warm-up step to the end of the
last step; the engine's per-epoch validation comes after that and is not counted).

Memory: on CUDA ``torch.cuda.max_memory_allocated()``, and its growth over what was
allocated before training (models and data; the optimizer state is created during the
first step, so it counts). On CPU the peak RSS of the process (``ru_maxrss``) and its growth
over the RSS before training, measured in a SECOND fresh process per variant (warm-up 0, 2
steps: the peak is reached in the first) that runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so
every tensor is its own mapping, returned to the OS when freed, and RSS follows the live
tensors. With glibc's default (dynamic) threshold, freed mid-size buffers such as the
engine's 512-position chunks stay in the heap and the RSS peak reflects fragmentation, not
live memory (at the defaults it measured the engine at ~780 MiB over its models where its
live peak is ~300 MiB); ``--glibc-default`` measures that way anyway, in the timing process.
The timings always come from the default allocator (mmap-per-tensor makes every step pay
page faults, the engine's many chunk-sized buffers most: it would slow it ~2x).

Run:  .venv/bin/python benchmarks/bench_lm_kd_step.py                 # ~1-2 min on a quiet 2-core CPU
      .venv/bin/python benchmarks/bench_lm_kd_step.py --vocab 32000 --steps 4
      .venv/bin/python benchmarks/bench_lm_kd_step.py --device cuda --vocab 128256 --layers 8 --embd 1024 \
          --seq-len 1024 --batch-size 8 --steps 20
      .venv/bin/python benchmarks/bench_lm_kd_step.py --help
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
ALPHA = 0.5  # half KD, half next-token CE: the torchtune KD recipe's default mix
TEMPERATURE = 1.0
MAX_GRAD_NORM = 1.0
MIB = 1024 * 1024
VARIANTS = {"hand": "hand loop (TRL/torchtune style)", "engine": "engine train_causal_lm",
            "topk": "engine, top-k {k} signal"}


# --------------------------------------------------------------------------- worker (one variant, own process)

def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def build(args, torch, device):
    """Teacher (random init, seeded), the derived half-depth student, and the token rows:
    batch_size × (warmup + steps) rows of seq_len random ids, every position but the first a
    target (what the engine's packing makes of plain text)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from distill.hf import derive_student

    config = GPT2Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.embd,
                        n_head=max(1, args.embd // 64), n_positions=args.seq_len,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(config).to(device).eval()
    student = derive_student(teacher, num_layers=max(1, args.layers // 2)).to(device)
    rows = args.batch_size * (args.warmup + args.steps)
    input_ids = torch.randint(0, args.vocab, (rows, args.seq_len), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones(rows, args.seq_len, dtype=torch.bool)
    loss_mask[:, 0] = False
    tokens = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "loss_mask": loss_mask}
    return teacher, student, tokens


def hyperparameters(args):
    from distill.spec import Hyperparameters

    return Hyperparameters(epochs=1, batch_size=args.batch_size, learning_rate=args.lr, temperature=TEMPERATURE,
                           alpha=ALPHA, lr_scheduler="constant", max_grad_norm=MAX_GRAD_NORM, seed=0)


def run_engine(args, torch, device, teacher, student, tokens, stamps, top_k):
    """``train_causal_lm`` as ``run_text_distillation`` calls it; the Reporter's ``should_stop``,
    polled once at the end of every step (after ``loss.item()``, so the device is synced),
    timestamps the steps. Returns (mean train loss, seconds of the top-k teacher pass)."""
    from distill.spec import HFStudentSpec, JobSpec, LossSpec
    from distill.text_train import LogitsHead, Reporter, precompute_topk, train_causal_lm

    hp = hyperparameters(args)
    spec = JobSpec(teacher=Path("unused"), training_file=Path("unused"), task="causal_lm",
                   student=HFStudentSpec(source="derive", num_layers=max(1, args.layers // 2)),
                   hyperparameters=hp, loss=LossSpec(type="forward_kl"))
    probe = tokens["input_ids"][:1].to(device), tokens["attention_mask"][:1].to(device)
    teacher_head, student_head = LogitsHead(teacher, *probe), LogitsHead(student, *probe)
    signal, teacher_pass_s = None, 0.0
    if top_k:
        started = time.perf_counter()
        signal = precompute_topk(teacher_head, tokens, min(top_k, args.vocab), TEMPERATURE, args.vocab, device,
                                 args.batch_size)
        teacher_pass_s = time.perf_counter() - started
    total = args.warmup + args.steps
    stamps.append(time.perf_counter())

    def should_stop() -> bool:
        stamps.append(time.perf_counter())
        return False

    val_tokens = {name: tensor[:1] for name, tensor in tokens.items()}  # the per-epoch validation: one row
    history = train_causal_lm(spec, teacher_head, student_head, tokens, signal, args.vocab, device,
                              Reporter(lambda kind, data: None, should_stop, total), val_tokens,
                              lambda kind, data: None)
    return history[0]["train_loss"], teacher_pass_s


def run_hand(args, torch, device, teacher, student, tokens, stamps):
    """The usual online-KD step on full (B, L, V) logits of both models."""
    import torch.nn.functional as F

    from distill.train import epoch_order

    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    n = tokens["input_ids"].shape[0]
    order = epoch_order(hyperparameters(args), n, 1)  # the engine's batch order, so the losses compare
    loss_sum, count_sum = 0.0, 0
    student.train()
    stamps.append(time.perf_counter())
    for start in range(0, n, args.batch_size):
        idx = order[start:start + args.batch_size]
        ids = tokens["input_ids"][idx].to(device)
        mask = tokens["attention_mask"][idx].to(device)
        select = tokens["loss_mask"][idx][:, 1:].to(device).float()  # (B, L-1): logits at t predict t+1
        logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, L-1, V)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        log_q = F.log_softmax(logits.float() / TEMPERATURE, dim=-1)
        log_p = F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, L-1) forward KL per position
        count = select.sum()
        kd = (kl * select).sum() / count * TEMPERATURE**2
        ce = (F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                              reduction="none") * select.reshape(-1)).sum() / count
        loss = ALPHA * kd + (1 - ALPHA) * ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        loss_sum += loss.item() * int(count.item())
        count_sum += int(count.item())
        stamps.append(time.perf_counter())
    student.eval()
    return loss_sum / count_sum, 0.0


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.measure == "memory":  # the peak comes with the first step (the optimizer state is created there)
        args.warmup, args.steps = 0, 2
    teacher, student, tokens = build(args, torch, device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / MIB
    else:
        base = _rss_mib()
    stamps: list[float] = []
    if args.worker == "hand":
        loss, teacher_pass_s = run_hand(args, torch, device, teacher, student, tokens, stamps)
    else:
        loss, teacher_pass_s = run_engine(args, torch, device, teacher, student, tokens, stamps,
                                          args.top_k if args.worker == "topk" else 0)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / MIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    step_ms = [(b - a) * 1e3 for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
    print(json.dumps({"variant": args.worker, "loss": loss, "step_ms": step_ms, "teacher_pass_s": teacher_pass_s,
                      "peak_mib": peak, "base_mib": base}))


# --------------------------------------------------------------------------- driver

def run_worker(args, variant: str, measure: str) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--measure", measure]
    for name in ("vocab", "layers", "embd", "seq_len", "batch_size", "steps", "warmup", "lr", "top_k", "device",
                 "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # RSS follows live tensors (see the module docstring)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(f"{variant} ({measure}): worker failed\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_variant(args, variant: str) -> dict | None:
    """One timing run, plus (on CPU, unless --glibc-default) one memory run whose peaks replace
    the timing run's."""
    timed = run_worker(args, variant, "time")
    if timed is None or args.device.startswith("cuda") or args.glibc_default:
        return timed
    memory = run_worker(args, variant, "memory")
    return None if memory is None else {**timed, "peak_mib": memory["peak_mib"], "base_mib": memory["base_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4, help="teacher layers; the student gets half")
    parser.add_argument("--embd", type=int, default=256, help="hidden size (heads of 64)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--top-k", type=int, default=64, help="k of the top-k row (0 = no top-k row)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per variant, interleaved; medians shown")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0 = torch's default)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="CPU memory from the timing run, glibc's default allocator (see the docstring)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch  # for the header only

    variants = ["hand", "engine"] + (["topk"] if args.top_k else [])
    positions = args.batch_size * args.seq_len
    print(f"causal-LM KD step: GPT-2 teacher {args.layers} layers x {args.embd} -> derived student "
          f"{max(1, args.layers // 2)} layers, vocab {args.vocab:,}, batch {args.batch_size} x seq {args.seq_len} "
          f"({positions:,} tokens/step), {args.steps} timed steps after {args.warmup} warm-up, "
          f"forward KL T={TEMPERATURE} alpha={ALPHA}, AdamW lr {args.lr:g}")
    print(f"device {args.device}; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; each run in a fresh process; {args.repeats} run(s) per variant")
    print(f"one (B, L, V) float32 logits tensor = {positions * args.vocab * 4 / MIB:,.1f} MiB "
          f"(the hand loop holds several: both models' logits, log-softmaxes, the gradient)")
    print()

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:  # interleaved, so slow drift on a shared machine hits every variant
            result = measure_variant(args, variant)
            if result is not None:
                runs[variant].append(result)

    rows = {}
    for variant, results in runs.items():
        if not results:
            continue
        per_run = [statistics.median(r["step_ms"]) for r in results]
        all_steps = [ms for r in results for ms in r["step_ms"]]
        rows[variant] = {
            "ms": statistics.median(per_run), "min": min(all_steps), "max": max(all_steps),
            "tokens_s": positions / (statistics.median(per_run) / 1e3),
            "peak": statistics.median(r["peak_mib"] for r in results),
            "growth": statistics.median(r["peak_mib"] - r["base_mib"] for r in results),
            "loss": statistics.median(r["loss"] for r in results),
            "teacher_pass_s": statistics.median(r["teacher_pass_s"] for r in results),
        }
    hand = rows.get("hand")
    memory = "peak MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    header = (f"{'variant':<34} {'tokens/s':>9} {'x hand':>7} {'ms/step':>8} {'(min-max)':>13} "
              f"{memory:>12} {'+ training':>11} {'x hand':>7} {'mean loss':>10}")
    print(header)
    print("-" * len(header))
    for variant, r in rows.items():
        speed = f"{r['tokens_s'] / hand['tokens_s']:.2f}" if hand else "-"
        mem_ratio = f"{r['growth'] / hand['growth']:.2f}" if hand and hand["growth"] > 0 else "-"
        spread = f"({r['min']:.0f}-{r['max']:.0f})"
        name = VARIANTS[variant].format(k=args.top_k)
        print(f"{name:<34} {r['tokens_s']:>9,.0f} {speed:>7} {r['ms']:>8.0f} {spread:>13} {r['peak']:>12,.0f} "
              f"{r['growth']:>11,.0f} {mem_ratio:>7} {r['loss']:>10.4f}")
    print()
    if "topk" in rows:
        r = rows["topk"]
        rows_total = args.batch_size * (args.warmup + args.steps)
        print(f"top-k: the teacher pass over all {rows_total} rows took {r['teacher_pass_s']:.1f} s before training "
              f"(not in tokens/s; a job runs it once and reuses the signal every epoch)")
    if args.device.startswith("cuda"):
        print("peak = torch.cuda.max_memory_allocated(); '+ training' = peak - memory allocated before training "
              "(models and data)")
    else:
        print("peak RSS = ru_maxrss of the run's process; '+ training' = peak RSS - RSS before training (models and "
              "data loaded); " + ("glibc default allocator, timing run" if args.glibc_default else
                                  "separate run with MALLOC_MMAP_THRESHOLD_=65536"))
    print("ms/step: median per run (median over runs); (min-max) over all timed steps. "
          "mean loss: over all steps; hand and engine should agree (same data, order, init and loss).")


if __name__ == "__main__":
    main()
