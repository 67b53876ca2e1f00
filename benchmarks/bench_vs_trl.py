"""Causal-LM KD: the engine vs. TRL's real ``GKDTrainer``: tokens/s and peak training memory.

Runs in its own environment, since TRL is not a dependency of the service:

    benchmarks/setup_trl_env.sh                                   # once: benchmarks/.venv-trl (torch, trl, the engine)
    benchmarks/.venv-trl/bin/python benchmarks/bench_vs_trl.py    # defaults: vocab 8k and 32k (~5-8 min, 2 cores)
    benchmarks/.venv-trl/bin/python benchmarks/bench_vs_trl.py --vocab 8192 --rows 64 --epochs 1   # quick look

Identical setup for every variant (the issue's): a random-init GPT-2 teacher, 4 layers × 256
wide (4 heads), and a random-init 1-layer student of the same width (seed 0 for both, so
every variant starts from the same weights), the same 256 random rows × 64 tokens (seed 1),
batch 16, 3 epochs, AdamW lr 1e-4 without weight decay (the fused kernel in both: transformers'
default optimizer for torch >= 2.8, and the engine's), constant learning rate, gradients
clipped to norm 1, fp32, no gradient checkpointing, dropout off. The loss is the forward KL
(teacher ‖ student) at T = 1 over every next-token position (63 a row), summed and divided by
their number, with no cross-entropy term: what TRL's GKD computes with ``beta=0``.

  trl             ``trl.experimental.gkd.GKDTrainer`` (the class TRL ships; TRL 1.x moved it
                  under ``experimental``) with ``lmbda=0`` (never generates with the student:
                  off-policy), ``beta=0`` (forward KL), ``seq_kd=False``, the teacher as a
                  model object. Rows come through ``default_data_collator`` with
                  ``labels = input_ids``; no eval, no saving, no logging, no tqdm.
  engine, full, online   the engine's causal-LM token recipe (``distill.recipes.causal_lm.CausalLMToken``)
                  driven by its one training loop (``distill.loop.train``), given what
                  ``prepare()`` would have loaded from files (as ``bench_lm_kd_step.py`` does),
                  ``alpha=1`` (KD only), ``teacher_signal.full_logits = "online"``: the teacher
                  runs on every batch, the loss is the fused path (distill/losses/chunked.py).
  engine, full vocabulary   the same on the worker's default: a teacher-signal store (empty: this
                  is a first job) and ``full_logits = "auto"``, which on a CPU runs the teacher
                  once over the data and keeps its float16 logits in the store; the epochs read
                  them. The teacher pass is timed separately.
  engine top-64   the same with ``teacher_signal.top_k = 64``: the recipe's ``teacher_signal()``
                  runs the teacher once over the data before training (and stores the compressed
                  signal).

For the two cached variants the table shows tokens/s of training alone (the issue's measure:
"training time only"; also what a repeat job, which finds the signal in the store, pays) and,
stricter, with the one teacher pass added (a first job).

tokens/s = input tokens (rows × 64) × epochs / training seconds. Training seconds: TRL from
``on_train_begin`` to the last ``on_step_end`` callback; the engine from its loop's
``training`` stage event to the last step (stamped by ``should_stop``, polled after every
optimizer step; its per-epoch validation on one row is inside that window).

Memory: peak RSS growth over the RSS just before training (models, data and, for TRL, the
constructed trainer), measured in a SECOND fresh process per variant that stops after 2
optimizer steps (the peak is reached in the first: the optimizer state is created there) and
runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor is its own mapping and the RSS
follows live tensors rather than glibc heap fragmentation (see ``bench_lm_kd_step.py``). The
timing process uses the default allocator.

Each variant runs in fresh subprocesses (``--repeats`` times, interleaved; medians shown).
Prints one table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _summary  # noqa: E402
MIB = 1024 * 1024
VARIANTS = ("trl", "online", "engine", "topk")
NAMES = {"trl": "TRL GKDTrainer", "online": "engine, full, online", "engine": "engine, full vocabulary",
         "topk": "engine, top-{k} signal"}
GOALS = {"trl": ("", ""), "online": ("", ""), "engine": (">= 1.2x", "<= 0.5x"), "topk": (">= 2x", "<= 0.5x")}


class _Enough(Exception):
    """Raised by the memory run's ``should_stop`` after its steps (no checkpoint is written)."""


def _memory_mib(args) -> float:
    """CPU: the RSS now; CUDA: the tensors allocated now (the peak is then max_memory_allocated)."""
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / MIB
    return _rss_mib()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


# --------------------------------------------------------------------------- worker (one variant, own process)

def build(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    def config(layers: int) -> GPT2Config:
        return GPT2Config(vocab_size=args.vocab, n_layer=layers, n_embd=args.embd, n_head=max(1, args.embd // 64),
                          n_positions=args.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(config(args.teacher_layers)).eval()
    torch.manual_seed(0)
    student = GPT2LMHeadModel(config(args.student_layers))
    input_ids = torch.randint(0, args.vocab, (args.rows, args.seq_len), generator=torch.Generator().manual_seed(1))
    return teacher, student, input_ids


def tiny_tokenizer():
    """GKDTrainer wants a tokenizer object (pad id for its generation config); the rows are ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<pad>")


def run_trl(args, teacher, student, input_ids, stamps: list, max_steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback, default_data_collator
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(),
                                 "attention_mask": torch.ones_like(input_ids).tolist(),
                                 "labels": input_ids.tolist()}).with_format("torch")

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        config = GKDConfig(
            output_dir=out_dir, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
            max_steps=max_steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, seed=0, bf16=args.precision == "bf16", fp16=False,
            gradient_checkpointing=False, use_cpu=args.device == "cpu", report_to="none", save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_length=args.seq_len,
            lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, disable_dropout=True)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                             processing_class=tiny_tokenizer(), data_collator=default_data_collator,
                             callbacks=[Stamp()])
        base = _memory_mib(args)  # after the trainer is built: models, data, accelerator; before any step
        output = trainer.train()
    return {"loss": output.training_loss, "teacher_pass_s": 0.0, "base_mib": base}


def run_engine(args, teacher, student, input_ids, stamps: list, max_steps: int, top_k: int,
               online: bool = False) -> dict:
    import torch

    from distill.loop import train
    from distill.recipes.base import RunContext
    from distill.recipes.causal_lm import CausalLMToken
    from distill.spec import Hyperparameters, JobSpec

    from distill.teacher_cache import TeacherCache

    hp = Hyperparameters(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, temperature=1.0,
                         alpha=1.0, lr_scheduler="constant", max_grad_norm=1.0, seed=0, weight_decay=0.0,
                         precision=args.precision)
    work = Path(tempfile.mkdtemp(prefix="bench-trl-engine-"))
    teacher.save_pretrained(work / "teacher")  # the store's key hashes the teacher's weight files
    signal = {"top_k": min(top_k, args.vocab)} if top_k else {"full_logits": "online" if online else "auto"}
    spec = JobSpec(teacher=work / "teacher", training_file=Path("unused.jsonl"), task="causal_lm",
                   student={"derive": {"num_layers": args.student_layers}}, hyperparameters=hp,
                   loss={"type": "forward_kl"}, teacher_signal=signal)
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
    loss_mask[:, 0] = False  # every position but the first is a target: 63 a row, as TRL's shifted labels
    tokens = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "loss_mask": loss_mask}
    training: list[bool] = []

    def on_event(kind: str, data: dict) -> None:
        if kind == "stage" and data["stage"] == "training":
            training.append(True)
            stamps.append(time.perf_counter())

    def should_stop() -> bool:
        if training:
            stamps.append(time.perf_counter())
            if max_steps > 0 and len(stamps) - 1 >= max_steps:
                raise _Enough
        return False

    base = _memory_mib(args)
    teacher_pass_s, loss = 0.0, float("nan")
    try:
        out_dir = work / "out"
        out_dir.mkdir()
        # The worker's default: a teacher-signal store (here empty, in the run's scratch folder: a first job).
        ctx = RunContext(device=torch.device(args.device), out_dir=out_dir, on_event=on_event, should_stop=should_stop,
                         teacher_cache=TeacherCache(work / "store", 20 << 30))
        recipe = CausalLMToken(spec, ctx)
        # What CausalLMToken.prepare() sets after loading the model files and tokenizing the data.
        recipe.teacher_model, recipe.model = teacher.to(args.device), student.to(args.device)
        recipe.teacher_model.requires_grad_(False)
        recipe.tokens = tokens
        recipe.val_tokens = {name: tensor[:1] for name, tensor in tokens.items()}  # per-epoch validation: one row
        recipe.shared = args.vocab
        recipe.heads(tokens, with_teacher=True)
        recipe.num_examples = input_ids.shape[0]
        recipe.signal = recipe.full = None
        recipe.intermediate = None
        started = time.perf_counter()
        if top_k:
            recipe.signal = recipe.teacher_signal()  # the teacher, once, over every row
        else:
            recipe.full = recipe.full_signal()  # the same, full vocabulary in float16 (None when online)
        teacher_pass_s = time.perf_counter() - started
        try:
            history = train(recipe, ctx, hp, checkpoint_interval_s=1e9)  # no step checkpoints
            loss = statistics.fmean(record["train_loss"] for record in history)
        except _Enough:
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"loss": loss, "teacher_pass_s": teacher_pass_s, "base_mib": base}


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    max_steps = 2 if args.measure == "memory" else -1
    teacher, student, input_ids = build(args)
    stamps: list[float] = []
    if args.worker == "trl":
        result = run_trl(args, teacher, student, input_ids, stamps, max_steps)
    else:
        result = run_engine(args, teacher, student, input_ids, stamps, max_steps,
                            args.top_k if args.worker == "topk" else 0, online=args.worker == "online")
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / MIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"variant": args.worker, "steps": len(stamps) - 1, "train_s": stamps[-1] - stamps[0],
                      "peak_mib": peak, **result}))


# --------------------------------------------------------------------------- driver

def run_worker(args, variant: str, measure: str) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--measure", measure]
    for name in ("vocab", "teacher_layers", "student_layers", "embd", "seq_len", "rows", "batch_size", "epochs",
                 "lr", "top_k", "threads", "device", "precision"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_DISABLE_RICH="1", TRL_EXPERIMENTAL_SILENCE="1")
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # RSS follows live tensors (see the module docstring)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(f"{variant} ({measure}, vocab {args.vocab}): worker failed\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  ran vocab {args.vocab} {variant} ({measure}): {result['steps']} steps in {result['train_s']:.1f} s, "
          f"RSS +{result['peak_mib'] - result['base_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return result


def bench_vocab(args) -> list[dict]:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:  # interleaved: drift on a shared machine hits every variant
            timed = run_worker(args, variant, "time")
            memory = run_worker(args, variant, "memory") if timed else None
            if timed and memory:
                runs[variant].append({**timed, "growth": memory["peak_mib"] - memory["base_mib"]})
    tokens = args.rows * args.seq_len * args.epochs
    rows = []
    for variant, results in runs.items():
        if not results:
            continue
        train_s = statistics.median(r["train_s"] for r in results)
        pass_s = statistics.median(r["teacher_pass_s"] for r in results)
        rows.append({"vocab": args.vocab, "variant": variant, "train_s": train_s, "tokens_s": tokens / train_s,
                     "tokens_s_with_pass": tokens / (train_s + pass_s), "teacher_pass_s": pass_s,
                     "spread": (min(r["train_s"] for r in results), max(r["train_s"] for r in results)),
                     "growth": statistics.median(r["growth"] for r in results),
                     "loss": statistics.median(r["loss"] for r in results),
                     "steps": results[0]["steps"]})
    return rows


BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0}  # dense bf16 tensor-core peaks from the vendors' data sheets


def model_flops_per_token(args) -> float:
    """Training FLOPs per input token of one KD step, PaLM-style (Chowdhery et al. 2022, appendix B):
    the student's forward + backward 6·N + 12·L·d·T, the teacher's forward 2·N + 4·L·d·T, with N the
    matmul parameters (12·L·d² per GPT-2 block plus the V·d output head; the embedding lookup is free)."""
    def n(layers):
        return 12 * layers * args.embd ** 2 + args.vocab * args.embd
    student = 6 * n(args.student_layers) + 12 * args.student_layers * args.embd * args.seq_len
    teacher = 2 * n(args.teacher_layers) + 4 * args.teacher_layers * args.embd * args.seq_len
    return student + teacher


def print_mfu(args, rows: list[dict]) -> None:
    import torch

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        print(f"MFU: no bf16 peak known for {name!r}; pass --peak-tflops")
        return
    print(f"\nmodel FLOPs utilization on {name} (bf16 peak {peak:g} TFLOP/s); {args.epochs} epoch(s), so every variant "
          "does the same model FLOPs when its teacher pass is counted")
    for r in rows:
        flops = model_flops_per_token(argparse.Namespace(**{**vars(args), "vocab": r["vocab"]}))
        mfu = flops * r["tokens_s_with_pass"] / (peak * 1e12)
        print(f"  {NAMES[r['variant']].format(k=args.top_k):<26} {r['tokens_s_with_pass']:>12,.0f} tok/s  "
              f"{flops * r['tokens_s_with_pass'] / 1e12:>7.1f} TFLOP/s  MFU {mfu:6.1%}  (goal >= 40%)")
        if r["variant"] in ("online", "engine"):
            _summary.record(f"GPU KD step MFU, {NAMES[r['variant']]}", f"{mfu:.1%}", f"bf16 peak {peak:g} TFLOP/s",
                            None, ">= 40%", mfu >= 0.40)


def print_table(args, rows: list[dict]) -> None:
    header = (f"{'vocab':>6} {'variant':<24} {'steps':>5} {'train s':>8} {'tokens/s':>9} {'x TRL':>6} "
              f"{'goal':>7} {'+ teacher pass':>15} {'x TRL':>6} {'RSS + training MiB':>19} {'x TRL':>6} "
              f"{'goal':>7} {'mean loss':>10}")
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        trl = next((r for r in rows if r["vocab"] == vocab and r["variant"] == "trl"), None)
        for r in (r for r in rows if r["vocab"] == vocab):
            speed_goal, memory_goal = GOALS[r["variant"]]
            ratio = f"{r['tokens_s'] / trl['tokens_s']:.2f}" if trl else "-"
            ratio_pass = f"{r['tokens_s_with_pass'] / trl['tokens_s']:.2f}" if trl else "-"
            mem_ratio = f"{r['growth'] / trl['growth']:.2f}" if trl and trl["growth"] > 0 else "-"
            with_pass = f"{r['tokens_s_with_pass']:,.0f} ({r['teacher_pass_s']:.1f}s)" if r["teacher_pass_s"] else ""
            print(f"{vocab:>6} {NAMES[r['variant']].format(k=args.top_k):<24} {r['steps']:>5} {r['train_s']:>8.1f} "
                  f"{r['tokens_s']:>9,.0f} {ratio:>6} {speed_goal:>7} {with_pass:>15} "
                  f"{ratio_pass if with_pass else '':>6} {r['growth']:>19,.0f} {mem_ratio:>6} {memory_goal:>7} "
                  f"{r['loss']:>10.4f}")
            if trl and r["variant"] in ("engine", "topk"):
                name = "full vocabulary" if r["variant"] == "engine" else f"top-{args.top_k}"
                # The measure is training time only (its own figures are): a repeat job, whose
                # teacher signal comes from the store, trains at this rate.
                train = r["tokens_s"] / trl["tokens_s"]
                _summary.record(f"LM KD tokens/s, {name}, V={vocab}, training", f"{r['tokens_s']:,.0f} tok/s",
                                f"TRL GKDTrainer {trl['tokens_s']:,.0f} tok/s", train, speed_goal,
                                train >= float(speed_goal.split()[-1].rstrip("x")))
                first = r["tokens_s_with_pass"] / trl["tokens_s"]  # a first job: its one teacher pass counted too
                _summary.record(f"LM KD tokens/s, {name}, V={vocab}, first job incl. teacher pass",
                                f"{r['tokens_s_with_pass']:,.0f} tok/s", f"TRL GKDTrainer {trl['tokens_s']:,.0f} tok/s",
                                first, "(stricter than the goal)", None)
                if trl["growth"] > 0:
                    memory = r["growth"] / trl["growth"]
                    _summary.record(f"LM KD peak training memory, {name}, V={vocab}", f"+{r['growth']:,.0f} MiB",
                                    f"TRL GKDTrainer +{trl['growth']:,.0f} MiB", memory, memory_goal, memory <= 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32000], help="vocabulary sizes (8192 32000)")
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-layers", type=int, default=1)
    parser.add_argument("--embd", type=int, default=256, help="hidden size of both (heads of 64)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per variant, interleaved; medians shown")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = torch's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast in the engine, bf16=True in TRL (GPUs)")
    parser.add_argument("--gpu-mfu", action="store_true",
                        help="issue 9's GPU check: --device cuda --precision bf16, a 24x1152 teacher (~419M) and "
                             "5x1152 student (~117M), vocab 32000, seq 1024, batch 8, 256 rows, 1 epoch; adds "
                             "model FLOPs utilization against the GPU's bf16 peak")
    parser.add_argument("--peak-tflops", type=float, default=0, help="the GPU's bf16 peak, when not in the table")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu_mfu:
        args.device, args.precision, args.vocab, args.seq_len, args.batch_size = "cuda", "bf16", [32000], 1024, 8
        args.teacher_layers, args.student_layers, args.embd, args.rows, args.epochs = 24, 5, 1152, 256, 1
    if args.worker:
        args.vocab = args.vocab[0]
        worker(args)
        return

    import torch
    import transformers
    import trl

    print(f"causal-LM KD vs TRL GKDTrainer: GPT-2 teacher {args.teacher_layers}x{args.embd} -> random-init student "
          f"{args.student_layers}x{args.embd}, {args.rows} rows x {args.seq_len} tokens, batch {args.batch_size}, "
          f"{args.epochs} epochs, forward KL T=1 (GKD lmbda=0 beta=0), AdamW (fused) lr {args.lr:g} constant, clip 1, fp32")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{args.threads or torch.get_num_threads()}; each run in a fresh process; {args.repeats} run(s) per variant")
    print()
    started = time.perf_counter()
    rows = []
    for vocab in args.vocab:
        rows += bench_vocab(argparse.Namespace(**{**vars(args), "vocab": vocab}))
    print_table(args, rows)
    if args.device == "cuda":
        print_mfu(args, rows)
    print()
    print("tokens/s = rows x seq_len x epochs / training seconds; x TRL: higher is better. '+ teacher pass': the top-k "
          "signal's one teacher pass over the data (before training) added to the training time.")
    print("RSS + training = peak RSS - RSS before training, in a separate 2-step run, MALLOC_MMAP_THRESHOLD_=65536; "
          "x TRL: lower is better. mean loss: mean over epochs of the training loss (KL; top-k differs by design).")
    print(f"(took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
