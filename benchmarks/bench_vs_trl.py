"""Causal-LM KD: the engine vs. TRL's real ``GKDTrainer``: tokens/s and peak training memory.

Runs in its own environment, since TRL is not a dependency of the service:

    benchmarks/setup_trl_env.sh                                   # once: benchmarks/.venv-trl (torch, trl, the engine)
    benchmarks/.venv-trl/bin/python benchmarks/bench_vs_trl.py    # defaults: vocab 8k and 32k (~5-8 min, 2 cores)
    benchmarks/.venv-trl/bin/python benchmarks/bench_vs_trl.py --vocab 8192 --rows 64 --epochs 1   # quick look

Identical setup for every variant (the issue's): a random-init GPT-2 teacher, 4 layers × 256
wide (4 heads), and a random-init 1-layer student of the same width (seed 0 for both, so
every variant starts from the same weights), the same 256 random rows × 64 tokens (seed 1),
batch 16, 3 epochs, AdamW lr 1e-4 without weight decay, constant learning rate, gradients
clipped to norm 1, fp32, no gradient checkpointing, dropout off. The loss is the forward KL
(teacher ‖ student) at T = 1 over every next-token position (63 a row), summed and divided by
their number, with no cross-entropy term: what TRL's GKD computes with ``beta=0``.

  trl             ``trl.experimental.gkd.GKDTrainer`` (the class TRL ships; TRL 1.x moved it
                  under ``experimental``) with ``lmbda=0`` (never generates with the student:
                  off-policy), ``beta=0`` (forward KL), ``seq_kd=False``, the teacher as a
                  model object. Rows come through ``default_data_collator`` with
                  ``labels = input_ids``; no eval, no saving, no logging, no tqdm.
  engine          the engine's causal-LM token recipe (``distill.recipes.causal_lm.CausalLMToken``)
                  driven by its one training loop (``distill.loop.train``), given what
                  ``prepare()`` would have loaded from files (as ``bench_lm_kd_step.py`` does),
                  ``alpha=1`` (KD only), full-vocabulary teacher logits every batch.
  engine top-64   the same with ``teacher_signal.top_k = 64``: the recipe's ``teacher_signal()``
                  runs the teacher once over the data before training; its time is shown
                  separately and in a second tokens/s column that includes it.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
VARIANTS = ("trl", "engine", "topk")
NAMES = {"trl": "TRL GKDTrainer", "engine": "engine, full vocabulary", "topk": "engine, top-{k} signal"}
GOALS = {"trl": ("", ""), "engine": (">= 1.2x", "<= 0.5x"), "topk": (">= 2x", "<= 0.5x")}


class _Enough(Exception):
    """Raised by the memory run's ``should_stop`` after its steps (no checkpoint is written)."""


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
            weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=0, bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_length=args.seq_len,
            lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, disable_dropout=True)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                             processing_class=tiny_tokenizer(), data_collator=default_data_collator,
                             callbacks=[Stamp()])
        base = _rss_mib()  # after the trainer is built: models, data, accelerator; before any step
        output = trainer.train()
    return {"loss": output.training_loss, "teacher_pass_s": 0.0, "base_mib": base}


def run_engine(args, teacher, student, input_ids, stamps: list, max_steps: int, top_k: int) -> dict:
    import torch

    from distill.loop import train
    from distill.recipes.base import RunContext
    from distill.recipes.causal_lm import CausalLMToken
    from distill.spec import Hyperparameters, JobSpec

    hp = Hyperparameters(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, temperature=1.0,
                         alpha=1.0, lr_scheduler="constant", max_grad_norm=1.0, seed=0, weight_decay=0.0,
                         precision="fp32")
    spec = JobSpec(teacher=Path("unused-teacher"), training_file=Path("unused.jsonl"), task="causal_lm",
                   student={"derive": {"num_layers": args.student_layers}}, hyperparameters=hp,
                   loss={"type": "forward_kl"}, teacher_signal={"top_k": min(top_k, args.vocab)} if top_k else {})
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

    base = _rss_mib()
    teacher_pass_s, loss = 0.0, float("nan")
    with tempfile.TemporaryDirectory(prefix="bench-trl-engine-") as out_dir:
        ctx = RunContext(device=torch.device("cpu"), out_dir=Path(out_dir), on_event=on_event,
                         should_stop=should_stop)
        recipe = CausalLMToken(spec, ctx)
        # What CausalLMToken.prepare() sets after loading the model files and tokenizing the data.
        recipe.teacher_model, recipe.model = teacher, student
        recipe.teacher_model.requires_grad_(False)
        recipe.tokens = tokens
        recipe.val_tokens = {name: tensor[:1] for name, tensor in tokens.items()}  # per-epoch validation: one row
        recipe.shared = args.vocab
        recipe.heads(tokens, with_teacher=True)
        recipe.num_examples = input_ids.shape[0]
        recipe.signal = None
        if top_k:
            started = time.perf_counter()
            recipe.signal = recipe.teacher_signal()  # the teacher, once, over every row
            teacher_pass_s = time.perf_counter() - started
        try:
            history = train(recipe, ctx, hp, checkpoint_interval_s=1e9)  # no step checkpoints
            loss = statistics.fmean(record["train_loss"] for record in history)
        except _Enough:
            pass
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
                            args.top_k if args.worker == "topk" else 0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"variant": args.worker, "steps": len(stamps) - 1, "train_s": stamps[-1] - stamps[0],
                      "peak_mib": peak, **result}))


# --------------------------------------------------------------------------- driver

def run_worker(args, variant: str, measure: str) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--measure", measure]
    for name in ("vocab", "teacher_layers", "student_layers", "embd", "seq_len", "rows", "batch_size", "epochs",
                 "lr", "top_k", "threads"):
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
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.vocab = args.vocab[0]
        worker(args)
        return

    import torch
    import transformers
    import trl

    print(f"causal-LM KD vs TRL GKDTrainer: GPT-2 teacher {args.teacher_layers}x{args.embd} -> random-init student "
          f"{args.student_layers}x{args.embd}, {args.rows} rows x {args.seq_len} tokens, batch {args.batch_size}, "
          f"{args.epochs} epochs, forward KL T=1 (GKD lmbda=0 beta=0), AdamW lr {args.lr:g} constant, clip 1, fp32")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{args.threads or torch.get_num_threads()}; each run in a fresh process; {args.repeats} run(s) per variant")
    print()
    started = time.perf_counter()
    rows = []
    for vocab in args.vocab:
        rows += bench_vocab(argparse.Namespace(**{**vars(args), "vocab": vocab}))
    print_table(args, rows)
    print()
    print("tokens/s = rows x seq_len x epochs / training seconds; x TRL: higher is better. '+ teacher pass': the top-k "
          "signal's one teacher pass over the data (before training) added to the training time.")
    print("RSS + training = peak RSS - RSS before training, in a separate 2-step run, MALLOC_MMAP_THRESHOLD_=65536; "
          "x TRL: lower is better. mean loss: mean over epochs of the training loss (KL; top-k differs by design).")
    print(f"(took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
