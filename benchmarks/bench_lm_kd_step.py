"""The engine's causal-LM KD training loop vs. a hand-written one: tokens/s and peak memory.

Same teacher (a random-init GPT-2), same student (its half-depth derivation, DistilBERT
style: ``distill.hf.derive_student``), same random token rows in the same order, same batch
size, sequence length, steps, loss and optimizer:

  hand            the loop people usually write (TRL GKD / torchtune KD recipe style):
                  ``student(input_ids).logits`` (B, L, V), the teacher's (B, L, V) logits under
                  ``no_grad`` on every batch, forward KL via log_softmax over the full vocabulary
                  at every position, masked mean, plus the next-token cross-entropy.
  engine          the engine's causal-LM token recipe (``distill.recipes.causal_lm.CausalLMToken``)
                  driven by the engine's one training loop (``distill.loop.train``), on the
                  same prepared models and tokens: the recipe is built from a JobSpec and given
                  what its ``prepare()`` would have loaded from files (models, tokens, shared
                  vocabulary), then the loop runs it. Models run to their last hidden states;
                  the loss is the fused path of ``distill.losses.lm_loss`` (64–256 positions at
                  a time, gradients computed in the forward pass): no (B, L, V) tensor. No
                  teacher-signal store here, so the teacher runs on every batch (online).
  engine top-k    the same, with ``teacher_signal.top_k``: the recipe's own ``teacher_signal()``
                  runs the teacher once over the data before training (its time is shown
                  separately: a real job reuses it every epoch), the loss reads the stored top-k.

Loss for all: ``alpha * T² * KL(teacher ‖ student) + (1 - alpha) * CE`` with alpha 0.5, T 1,
summed over the positions that count and divided by their number; AdamW (no weight
decay), constant learning rate, gradients clipped to norm 1; dropout off, so the first two
rows do the same arithmetic and their mean losses agree (top-k differs by design).

Every vocabulary in ``--vocab`` (default 8,192 and 32,000) gets its own table. Each variant
runs in FRESH subprocesses. tokens/s counts input tokens (batch × seq_len) over the steps
after ``--warmup`` (timed from the end of the last warm-up step to the end of the last step:
the engine's steps are stamped by its ``should_stop`` callable, which the loop polls after
every optimizer step, its start by the ``training`` stage event; its per-epoch validation
comes after the last step and is not counted, nor are step checkpoints: the loop is given
an interval longer than the run).

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

Run:  .venv/bin/python benchmarks/bench_lm_kd_step.py                 # ~3 min on a quiet 2-core CPU
      .venv/bin/python benchmarks/bench_lm_kd_step.py --vocab 8192 --steps 8 --warmup 2 --repeats 3
      .venv/bin/python benchmarks/bench_lm_kd_step.py --device cuda --vocab 128256 --layers 8 --embd 1024 \
          --seq-len 1024 --batch-size 8 --steps 20 --precision bf16
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
VARIANTS = {"hand": "hand loop (TRL/torchtune style)", "engine": "engine CausalLMToken + loop",
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
                           alpha=ALPHA, lr_scheduler="constant", max_grad_norm=MAX_GRAD_NORM, seed=0,
                           weight_decay=0.0, precision=args.precision)


def run_engine(args, torch, device, teacher, student, tokens, stamps, top_k):
    """The causal-LM token recipe, driven by ``distill.loop.train`` as ``run_distillation``
    drives it, on prepared models and tokens. The loop's ``training`` stage event stamps the
    start, ``should_stop`` (polled after every optimizer step) stamps each step.
    Returns (mean train loss, seconds of the top-k teacher pass)."""
    import tempfile

    from distill.loop import train
    from distill.recipes.base import RunContext
    from distill.recipes.causal_lm import CausalLMToken
    from distill.spec import JobSpec

    hp = hyperparameters(args)
    spec = JobSpec(teacher=Path("unused-teacher"), training_file=Path("unused.jsonl"), task="causal_lm",
                   student={"derive": {"num_layers": max(1, args.layers // 2)}}, hyperparameters=hp,
                   loss={"type": "forward_kl"}, teacher_signal={"top_k": min(top_k, args.vocab)} if top_k else {})
    cuda = device.type == "cuda"
    training = []  # non-empty once the loop has started: the teacher pass polls should_stop too

    def on_event(kind: str, data: dict) -> None:
        if kind == "stage" and data["stage"] == "training":
            if cuda:
                torch.cuda.synchronize(device)
            training.append(True)
            stamps.append(time.perf_counter())

    def should_stop() -> bool:
        if training:
            if cuda:  # the loop does not sync per step; a step's time needs its kernels finished
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
        return False

    with tempfile.TemporaryDirectory(prefix="bench-lm-") as out_dir:
        ctx = RunContext(device=device, out_dir=Path(out_dir), on_event=on_event, should_stop=should_stop)
        recipe = CausalLMToken(spec, ctx)
        # What CausalLMToken.prepare() sets after loading the model files and tokenizing the data files.
        recipe.teacher_model, recipe.model = teacher, student
        recipe.teacher_model.requires_grad_(False)
        recipe.tokens = tokens
        recipe.val_tokens = {name: tensor[:1] for name, tensor in tokens.items()}  # per-epoch validation: one row
        recipe.shared = args.vocab
        recipe.heads(tokens, with_teacher=True)
        recipe.num_examples = tokens["input_ids"].shape[0]
        teacher_pass_s = 0.0
        recipe.signal = None
        if top_k:
            started = time.perf_counter()
            recipe.signal = recipe.teacher_signal()  # the teacher, once, over every row
            teacher_pass_s = time.perf_counter() - started
        history = train(recipe, ctx, hp, checkpoint_interval_s=1e9)  # no step checkpoints inside the timing
    return history[0]["train_loss"], teacher_pass_s


def run_hand(args, torch, device, teacher, student, tokens, stamps):
    """The usual online-KD step on full (B, L, V) logits of both models."""
    import torch.nn.functional as F

    from distill.loop import autocast_for, epoch_order

    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    n = tokens["input_ids"].shape[0]
    order = epoch_order(0, n, 0)  # the engine's batch order (seed 0, first epoch), so the losses compare
    autocast = autocast_for(device, args.precision)  # the engine's autocast for this precision
    loss_sum, count_sum = 0.0, 0
    student.train()
    stamps.append(time.perf_counter())
    for start in range(0, n, args.batch_size):
        idx = order[start:start + args.batch_size]
        ids = tokens["input_ids"][idx].to(device)
        mask = tokens["attention_mask"][idx].to(device)
        select = tokens["loss_mask"][idx][:, 1:].to(device).float()  # (B, L-1): logits at t predict t+1
        with autocast:
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
        if device.type == "cuda":
            torch.cuda.synchronize(device)
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
                 "threads", "precision"):
        value = getattr(args, name)
        cmd += [f"--{name.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
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


def default_steps(vocab: int) -> int:
    """Timed steps when --steps is not given: fewer where a step is slow (the logits grow with V)."""
    return 5 if vocab <= 16_384 else 2


def bench_vocab(args, torch) -> None:
    """One table: every variant at ``args.vocab``."""
    variants = ["hand", "engine"] + (["topk"] if args.top_k else [])
    positions = args.batch_size * args.seq_len
    print(f"vocab {args.vocab:,}: {args.steps} timed steps after {args.warmup} warm-up; one (B, L, V) float32 "
          f"logits tensor = {positions * args.vocab * 4 / MIB:,.1f} MiB (the hand loop holds several: both models' "
          "logits, log-softmaxes, the gradient)")

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
    if "topk" in rows:
        r = rows["topk"]
        rows_total = args.batch_size * (args.warmup + args.steps)
        print(f"top-k: the teacher pass over all {rows_total} rows took {r['teacher_pass_s']:.1f} s before training "
              f"(not in tokens/s; a job runs it once and reuses the signal every epoch)")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32000],
                        help="vocabulary sizes, one table each (default 8192 32000)")
    parser.add_argument("--layers", type=int, default=4, help="teacher layers; the student gets half")
    parser.add_argument("--embd", type=int, default=256, help="hidden size (heads of 64)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per run (default: 5 at vocab <= 16k, 2 above)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--top-k", type=int, default=64, help="k of the top-k row (0 = no top-k row)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per variant, interleaved; medians shown")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the engine's hyperparameters.precision; the hand loop uses the same autocast")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0 = torch's default)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="CPU memory from the timing run, glibc's default allocator (see the docstring)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.vocab = args.vocab[0]
        worker(args)
        return

    import torch  # for the header only

    positions = args.batch_size * args.seq_len
    print(f"causal-LM KD step: GPT-2 teacher {args.layers} layers x {args.embd} -> derived student "
          f"{max(1, args.layers // 2)} layers, batch {args.batch_size} x seq {args.seq_len} "
          f"({positions:,} tokens/step), forward KL T={TEMPERATURE} alpha={ALPHA}, AdamW lr {args.lr:g}, "
          f"clip {MAX_GRAD_NORM}, {args.precision}")
    print(f"device {args.device}; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; each run in a fresh process; {args.repeats} run(s) per variant")
    print()
    steps = args.steps
    for vocab in args.vocab:
        bench_vocab(argparse.Namespace(**{**vars(args), "vocab": vocab,
                                          "steps": steps if steps is not None else default_steps(vocab)}), torch)

    if args.device.startswith("cuda"):
        print("peak = torch.cuda.max_memory_allocated(); '+ training' = peak - memory allocated before training "
              "(models and data)")
    else:
        print("peak RSS = ru_maxrss of the run's process; '+ training' = peak RSS - RSS before training (models and "
              "data loaded); " + ("glibc default allocator, timing run" if args.glibc_default else
                                  "separate run with MALLOC_MMAP_THRESHOLD_=65536"))
    print("x hand: tokens/s ratio (higher is better) and '+ training' ratio (lower is better). ms/step: median per "
          "run (median over runs); (min-max) over all timed steps.")
    print("mean loss: over all steps; hand and engine should agree (same data, order, init and loss); top-k differs "
          "by design (k+1 buckets).")


if __name__ == "__main__":
    main()
