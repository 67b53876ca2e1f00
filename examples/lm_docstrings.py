"""Distil a small GPT-2 trained on the Python standard library's docstrings into one of half its depth.

Everything runs offline, on the CPU, in a few minutes (about 4 on a 2-core machine):

1. Corpus: the docstrings of the standard library's modules, classes and functions, which
   every Python installation already has (about 1 MB of English technical prose). Split
   into training and validation documents and written as JSONL (``{"text": ...}``).
2. Tokenizer: a byte-level BPE (4,096 tokens, ``<|endoftext|>`` as eos and pad) trained on
   that corpus with the ``tokenizers`` library and saved as a transformers tokenizer.
3. Teacher: a 6-layer GPT-2 trained from scratch for a fixed time (``--teacher-minutes``)
   and saved with ``save_pretrained`` (safetensors) next to the tokenizer.
4. Distillation with the engine: a ``JobSpec`` (task ``causal_lm``, student derived from
   the teacher with half its layers, forward KL) run by ``distill.train.run_distillation``
   — the same call a worker makes for a job submitted over HTTP.
5. Report: parameters, validation perplexity (teacher, student before and after
   distillation), generation speed, a sample completion from each model, and the job as
   the body you would POST to ``/v1/distillation/jobs``.

Run from the repository root::

    .venv/bin/python examples/lm_docstrings.py                      # defaults, ~4 min on 2 cores
    .venv/bin/python examples/lm_docstrings.py --teacher-minutes 5  # a better teacher
    .venv/bin/python examples/lm_docstrings.py --help

Files go to ``--workdir`` (default ``var/lm_example``): ``data/``, ``tokenizer/``,
``teacher/`` and ``distill/final/`` (the student, a Hugging Face directory with a model card).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import os
import pkgutil
import random
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally; never reach for the hub

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from distill.hf import load_causal_lm, load_tokenizer  # noqa: E402
from distill.spec import JobSpec  # noqa: E402
from distill.train import run_distillation  # noqa: E402

EOS = "<|endoftext|>"
BLOCK = 128  # tokens per training sequence, for the teacher and the distillation alike
PROMPT = "Return True if"  # the sample completion's prompt: a typical docstring opening

# Standard-library modules not to import: they open a browser or print on import (antigravity,
# this), need a display (tkinter, turtle, idlelib), touch the terminal (readline), are test
# suites or data (test, pydoc_data), may be setuptools' copy in a venv (distutils), or are
# hundreds of near-identical generated codecs (encodings).
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "readline", "test",
                "pydoc_data", "encodings", "lib2to3", "ensurepip", "venv", "distutils", "__main__"}


# ---- 1. corpus: the standard library's docstrings ------------------------------------------------------------

def quiet_import(name: str):
    """Import a module, or None if it can't be (platform-specific modules, optional C extensions)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # deprecated modules warn on import
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - ImportError, OSError, ...: whatever it is, skip the module
        return None


def stdlib_modules() -> list:
    """Every public top-level standard-library module, plus one level of submodules of packages
    (``email.message``, ``json.decoder``, ``concurrent.futures``, ...)."""
    found = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES or (module := quiet_import(name)) is None:
            continue
        found.append(module)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if not info.name.startswith("_") and info.name not in SKIP_MODULES:
                if (sub := quiet_import(f"{name}.{info.name}")) is not None:
                    found.append(sub)
    return found


def public_objects(module):
    """The module itself, its public classes and functions defined there (not imported from
    elsewhere, which would repeat them), and the public methods of those classes."""
    yield module
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield obj
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
                    yield member
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield obj


def build_corpus(max_chars: int) -> list[str]:
    """Unique, plain-ASCII docstrings of at least 40 characters, up to ``max_chars`` in all."""
    documents, seen, total = [], set(), 0
    for module in stdlib_modules():
        for obj in public_objects(module):
            doc = inspect.getdoc(obj)  # dedented, trailing blank lines removed
            # Short ones are mostly "Return self." stubs; non-ASCII ones are rare (a few names and
            # symbols) and would only spend vocabulary on bytes the rest of the corpus never uses.
            if not doc or len(doc) < 40 or not doc.isascii() or doc in seen:
                continue
            seen.add(doc)
            documents.append(doc)
            total += len(doc)
            if total >= max_chars:
                return documents
    return documents


def split_documents(documents: list[str], validation_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle, then hold out whole documents: the validation text was never seen in training."""
    shuffled = list(documents)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * validation_fraction))
    return shuffled[n_val:], shuffled[:n_val]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# ---- 2. tokenizer ----------------------------------------------------------------------------------------------

def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE: any text encodes (no unknown token), spaces and newlines
    round-trip, and ``<|endoftext|>`` separates documents (eos = pad = bos, as in GPT-2)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS, bos_token=EOS,
                                   model_max_length=BLOCK * 2)


# ---- 3. teacher ------------------------------------------------------------------------------------------------

def pack_blocks(tokenizer, documents: list[str]) -> torch.Tensor:
    """Documents + eos, concatenated and cut into (n, BLOCK) rows: the engine's packing too
    (``data.packing``), so the teacher trains on exactly the kind of rows it is distilled on."""
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    stream = [token for document in ids for token in document + [tokenizer.eos_token_id]]
    return torch.tensor(stream[: len(stream) // BLOCK * BLOCK]).view(-1, BLOCK)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """exp(mean next-token cross-entropy) over all rows, as the engine computes its validation perplexity."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        rows = blocks[start:start + batch_size]
        total += model(input_ids=rows, labels=rows).loss.item() * rows.numel()  # mean over (BLOCK-1) targets
        count += rows.numel()
    return math.exp(total / count)


def train_teacher(tokenizer, train_blocks: torch.Tensor, val_blocks: torch.Tensor, args) -> tuple:
    """GPT-2 from scratch for ``args.teacher_minutes`` of wall time. Returns (model, tokens/s).

    The run length is a time budget, not a step count, so the learning-rate schedule follows
    elapsed time: a short linear warm-up, then cosine decay to 10% as the budget runs out."""
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=args.layers, n_embd=args.embd, n_head=args.embd // 64,
                        n_positions=2 * BLOCK, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        # No dropout: a few minutes of training leave the model underfitting, not overfitting.
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    budget = args.teacher_minutes * 60
    warmup_steps, step, tokens, last_report = 50, 0, 0, 0.0
    started = time.perf_counter()
    model.train()
    while (elapsed := time.perf_counter() - started) < budget:
        scale = min(1.0, (step + 1) / warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        for group in optimizer.param_groups:
            group["lr"] = args.teacher_lr * scale
        rows = train_blocks[torch.randint(0, len(train_blocks), (args.batch_size,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, tokens = step + 1, tokens + rows.numel()
        if elapsed - last_report >= 20:
            print(f"  teacher  {elapsed:5.0f}s  step {step:5d}  train loss {loss.item():.3f}  "
                  f"({tokens / len(train_blocks.view(-1)):.2f} passes over the data)", flush=True)
            last_report = elapsed
    seconds = time.perf_counter() - started
    print(f"  teacher  {seconds:5.0f}s  step {step:5d}  done: {tokens:,} tokens at {tokens / seconds:,.0f} tokens/s, "
          f"validation perplexity {perplexity(model, val_blocks):.2f}", flush=True)
    return model.eval(), tokens / seconds


# ---- 4. distillation with the engine ---------------------------------------------------------------------------

def transfer_documents(train_docs: list[str], tokenizer, args, teacher_tokens_per_s: float) -> list[str]:
    """The transfer set: enough training documents for ``args.distill_epochs`` epochs in about
    ``args.distill_minutes``.

    A distillation step costs about what a teacher training step cost (the half-depth student's
    forward and backward, plus the full teacher's forward for its targets), so the teacher's
    measured tokens/s sizes the set for this machine."""
    budget_tokens = args.distill_minutes * 60 * teacher_tokens_per_s / args.distill_epochs
    chosen, tokens = [], 0
    for document in train_docs:  # already shuffled
        chosen.append(document)
        tokens += len(tokenizer(document, add_special_tokens=False)["input_ids"]) + 1
        if tokens >= budget_tokens:
            break
    return chosen


def job_body(teacher: dict, training: str, validation: str, args) -> dict:
    """The job, in the JSON the engine's ``JobSpec.from_dict`` and the HTTP API both take."""
    return {
        "task": "causal_lm",
        "teacher": teacher,
        "student": {"derive": {"num_layers": args.layers // 2}},  # half the blocks, evenly spaced, first and last kept
        "training_file": training,
        "validation_file": validation,
        "method": "token",
        "loss": {"type": "forward_kl"},  # KL(teacher || student) over the full vocabulary at every position
        "data": {"max_length": BLOCK, "packing": True},
        "hyperparameters": {"epochs": args.distill_epochs, "batch_size": args.batch_size,
                            "learning_rate": args.distill_lr, "alpha": args.alpha, "temperature": 1.0,
                            "seed": args.seed},
        "metadata": {"teacher_name": "gpt2-stdlib-docstrings", "training_name": "stdlib docstrings"},
    }


class ProgressPrinter:
    """``on_event`` for the engine: stages and per-epoch metrics as they come, step progress
    every ``every_s`` seconds (the engine sends one every half second)."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.started, self.last = every_s, time.perf_counter(), 0.0

    def __call__(self, kind: str, data: dict) -> None:
        elapsed = time.perf_counter() - self.started
        if kind == "stage":
            details = ", ".join(f"{k} {v}" for k, v in data.items() if k != "stage")
            print(f"  engine   {elapsed:5.0f}s  stage {data['stage']}" + (f" ({details})" if details else ""),
                  flush=True)
        elif kind == "progress" and elapsed - self.last >= self.every_s:
            print(f"  engine   {elapsed:5.0f}s  step {data['step']}/{data['total_steps']}", flush=True)
            self.last = elapsed
        elif kind == "epoch":
            print(f"  engine   {elapsed:5.0f}s  epoch {data['epoch']}: train loss {data['train_loss']:.3f}, "
                  f"student validation perplexity {data['validation_student_perplexity']:.2f}", flush=True)


# ---- 5. report -------------------------------------------------------------------------------------------------

@torch.no_grad()
def complete(model, tokenizer, prompt: str, new_tokens: int = 32) -> str:
    """Greedy decoding, forbidding repeated 3-grams (small models otherwise loop on one phrase)."""
    ids = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, no_repeat_ngram_size=3,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def print_results(evaluation: dict) -> None:
    """The engine's evaluation (validation split, the worker's device) as a table."""
    teacher, student = evaluation["teacher"], evaluation["student"]
    rows = [
        ("parameters", f"{teacher['parameters']:,}", f"{student['parameters']:,}",
         f"{evaluation['parameter_ratio']:.1%}"),
        ("validation perplexity", f"{teacher['perplexity']:.2f}", f"{student['perplexity']:.2f}",
         f"{student['perplexity'] / teacher['perplexity']:.2f}x"),
        ("  student before distillation", "", f"{student['perplexity_before_training']:.2f}", ""),
        ("generation tokens/s", f"{teacher['generation_tokens_per_s']:.0f}",
         f"{student['generation_tokens_per_s']:.0f}", f"{evaluation['speedup']:.2f}x"),
        ("top-1 next-token agreement", "", f"{evaluation['top1_agreement']:.1%}", ""),
        ("KL(teacher || student), nats/token", "", f"{evaluation['kl_teacher_student']:.3f}", ""),
    ]
    print(f"\n{'':36}{'teacher':>11}{'student':>11}{'student/teacher':>17}")
    for name, *cells in rows:
        print((f"{name:36}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (11, 11, 17)))).rstrip())
    print(f"({evaluation['validation_tokens']:,} validation tokens, device {evaluation['device']}; generation: "
          "greedy, 32 new tokens after one validation text, batch of one)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("var/lm_example"))
    parser.add_argument("--max-corpus-chars", type=int, default=1_500_000)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=6, help="teacher depth; the student gets half")
    parser.add_argument("--embd", type=int, default=128, help="width (a multiple of 64: heads of 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences of 128 tokens per step")
    parser.add_argument("--teacher-minutes", type=float, default=2.0)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--distill-minutes", type=float, default=1.5, help="sizes the transfer set (approximate)")
    parser.add_argument("--distill-epochs", type=int, default=3)
    parser.add_argument("--distill-lr", type=float, default=5e-4)
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="weight of the KD loss; 1 - alpha on the next-token cross-entropy")
    parser.add_argument("--device", default="cpu",
                        help="the engine's device: cpu | cuda | auto (the teacher always trains on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.embd % 64:
        parser.error("--embd must be a multiple of 64")
    transformers_logging.set_verbosity_error()  # keep the output to this script's own lines
    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    data_dir, teacher_dir = args.workdir / "data", args.workdir / "teacher"

    print("1. corpus: standard-library docstrings", flush=True)
    t0 = time.perf_counter()
    documents = build_corpus(args.max_corpus_chars)
    train_docs, val_docs = split_documents(documents, 0.05, args.seed)
    write_jsonl(data_dir / "train.jsonl", train_docs)  # the full training split, for reference
    val_path = write_jsonl(data_dir / "validation.jsonl", val_docs)
    print(f"  {len(documents):,} docstrings, {sum(map(len, documents)):,} characters -> {len(train_docs):,} training "
          f"/ {len(val_docs):,} validation documents in {data_dir} ({time.perf_counter() - t0:.1f}s)")

    print("2. tokenizer: byte-level BPE", flush=True)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    tokenizer.save_pretrained(args.workdir / "tokenizer")
    train_blocks, val_blocks = pack_blocks(tokenizer, train_docs), pack_blocks(tokenizer, val_docs)
    print(f"  {len(tokenizer):,} tokens; {train_blocks.numel():,} training / {val_blocks.numel():,} validation tokens "
          f"in rows of {BLOCK} ({time.perf_counter() - t0:.1f}s)")

    print(f"3. teacher: GPT-2, {args.layers} layers x {args.embd}, {args.teacher_minutes:g} min", flush=True)
    teacher, teacher_speed = train_teacher(tokenizer, train_blocks, val_blocks, args)
    teacher.save_pretrained(teacher_dir)  # safetensors: the only weight format the service accepts
    tokenizer.save_pretrained(teacher_dir)
    teacher_seconds = time.perf_counter() - started

    print(f"4. distillation: engine, student = {args.layers // 2} of the teacher's {args.layers} layers", flush=True)
    t0 = time.perf_counter()
    transfer = transfer_documents(train_docs, tokenizer, args, teacher_speed)
    transfer_path = write_jsonl(data_dir / "transfer.jsonl", transfer)
    share = "all" if len(transfer) == len(train_docs) else f"{len(transfer):,} of the"
    print(f"  transfer set: {share} {len(train_docs):,} training documents (sized for {args.distill_epochs} epochs "
          f"in ~{args.distill_minutes:g} min at this machine's speed)")
    body = job_body({"path": str(teacher_dir.resolve())}, str(transfer_path.resolve()), str(val_path.resolve()), args)
    spec = JobSpec.from_dict(body)
    result = run_distillation(spec, args.workdir / "distill", on_event=ProgressPrinter(), device=args.device)
    distill_seconds = time.perf_counter() - t0

    print_results(result.evaluation)
    student = load_causal_lm(result.model_path)  # the exported directory, loaded as any user would
    student_tokenizer = load_tokenizer(result.model_path)
    print(f"\nprompt: {PROMPT!r}")
    print(f"  teacher: {complete(teacher, tokenizer, PROMPT)!r}")
    print(f"  student: {complete(student, student_tokenizer, PROMPT)!r}")

    # Over HTTP: upload the teacher folder as an archive and the two JSONL files (purpose=model /
    # dataset), then POST this body with their ids. The engine runs the same spec.
    http_body = job_body({"file_id": "file-<teacher.tar.gz>"}, "file-<transfer.jsonl>", "file-<validation.jsonl>", args)
    print("\nthe same job over HTTP (tar -czf teacher.tar.gz -C", teacher_dir.parent, teacher_dir.name, "and upload it"
          " with the JSONL files to /v1/files):")
    print("POST /v1/distillation/jobs")
    print(json.dumps(http_body, indent=2))

    print(f"\nstudent: {result.model_path}")
    print(f"time: corpus + tokenizer + teacher {teacher_seconds:.0f}s, distillation {distill_seconds:.0f}s, "
          f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
