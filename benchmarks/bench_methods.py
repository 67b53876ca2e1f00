"""Distillation methods side by side: same teacher, same data, same student start, same optimizer steps.

    token           off-policy token-level KD (forward KL on the dataset's completions)
    sequence        sequence-level KD: the teacher writes the completions, the student learns them (CE)
    on_policy       on-policy distillation (GKD, lambda 1, reverse KL): the student samples, the teacher scores
    on_policy λ=0.5 half the batches on the student's samples, half on the dataset's completions
    token (narrow)      a narrower student (fresh weights, half the width) with token-level KD ...
    token (narrow) + intermediate   ... and the same with the DistilBERT cosine loss on hidden states

Figures, on held-out data the student never saw:

    held-out ppl    the student's perplexity on held-out text (lower is better)
    teacher NLL     the teacher's mean per-token negative log-likelihood of the student's OWN sampled
                    completions (temperature 1) for held-out prompts: lower means the student writes
                    what the teacher would (the quantity on-policy distillation optimizes)
    train s         wall time of the job (teacher inference, generation and evaluation included)

The teacher is a 4-layer GPT-2 trained on a synthetic language (tests/factories.py); the students
(but the narrow pair) are its 2-layer derivation (DistilBERT initialisation). Each job runs through
``distill.train.run_distillation`` exactly as a worker would, on the CPU, seed 0.

Run:  .venv/bin/python benchmarks/bench_methods.py            # ~4 min on a quiet 2-core CPU
      .venv/bin/python benchmarks/bench_methods.py --epochs 2 --only token on_policy
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.spec import JobSpec  # noqa: E402
from distill.train import run_distillation  # noqa: E402
from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir,  # noqa: E402
                                        synthetic_language, tiny_gpt2)
from tests.factories import train_language_model, write_jsonl  # noqa: E402

METHODS = {
    "token": {"method": "token"},
    "sequence": {"method": "sequence", "generation": {"max_new_tokens": 24, "temperature": 1.0}},
    "on_policy": {"method": "on_policy", "on_policy": {"lambda": 1.0, "max_new_tokens": 24}},
    "on_policy_half": {"method": "on_policy", "on_policy": {"lambda": 0.5, "max_new_tokens": 24}},
    "narrow": {"method": "token", "student": {"architecture": {"kind": "hf", "config": {"n_layer": 2, "n_embd": 32}}}},
    "narrow_intermediate": {"method": "token", "intermediate": {"type": "cosine", "weight": 1.0},
                            "student": {"architecture": {"kind": "hf", "config": {"n_layer": 2, "n_embd": 32}}}},
}
LABELS = {"token": "token (off-policy)", "sequence": "sequence", "on_policy": "on_policy (λ=1, reverse KL)",
          "on_policy_half": "on_policy (λ=0.5)", "narrow": "token, narrow student",
          "narrow_intermediate": "token, narrow student + intermediate"}


def build(folder: Path):
    torch.manual_seed(0)
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    corpus = synthetic_language(1600, seed=3)
    documents = [" ".join(corpus[i:i + 4]) for i in range(0, len(corpus), 4)]
    teacher = train_language_model(tiny_gpt2(tokenizer, n_layer=4, n_embd=64, n_head=4), tokenizer, documents)
    teacher_dir = save_model_dir(teacher, tokenizer, folder / "teacher")
    sentences = synthetic_language(800, seed=0)
    pairs = [{"prompt": " ".join(s.split()[:3]), "completion": " " + " ".join(s.split()[3:])} for s in sentences]
    write_jsonl(folder / "train.jsonl", pairs[:480])
    write_jsonl(folder / "val.jsonl", pairs[480:560])
    held_text = [" ".join(sentences[i:i + 2]) for i in range(560, 800, 2)]
    held_prompts = [p["prompt"] for p in pairs[560:640]]
    return teacher, tokenizer, teacher_dir, held_text, held_prompts


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str]) -> float:
    nll = count = 0
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids + [tokenizer.eos_token_id]])
        nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def teacher_nll_of_samples(student, teacher, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> float:
    """Sample from the student (temperature 1, seed 0), score the sampled tokens with the teacher."""
    torch.manual_seed(0)
    nll = count = 0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        out = student.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                               max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:]
        ends = (new == tokenizer.eos_token_id).nonzero()
        keep = int(ends[0]) + 1 if len(ends) else len(new)  # up to and including the first eos
        if keep == 0:
            continue
        sequence = out[:, :ids.shape[1] + keep]
        logprobs = torch.log_softmax(teacher(input_ids=sequence).logits[0, :-1].float(), -1)
        targets = sequence[0, 1:]
        token_nll = -logprobs.gather(-1, targets[:, None])[:, 0]
        nll += token_nll[-keep:].sum().item()
        count += keep
    return nll / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--only", nargs="*", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher, tokenizer, teacher_dir, held_text, held_prompts = build(folder)
        rows = [("teacher", perplexity(teacher, tokenizer, held_text),
                 teacher_nll_of_samples(teacher, teacher, tokenizer, held_prompts), None)]
        for name in args.only:
            extra = dict(METHODS[name])
            spec = {"task": "causal_lm", "teacher": "teacher", "training_file": "train.jsonl",
                    "validation_file": "val.jsonl", "student": extra.pop("student", {"derive": {"num_layers": 2}}),
                    "hyperparameters": {"epochs": args.epochs, "batch_size": 16, "learning_rate": 3e-3, "seed": 0,
                                        "lr_scheduler": "constant"},
                    "data": {"max_length": 48}, **extra}
            start = time.perf_counter()
            result = run_distillation(JobSpec.from_dict(spec, base_dir=folder), folder / f"run-{name}", device="cpu",
                                      checkpoint_interval_s=1e9)
            seconds = time.perf_counter() - start
            student = AutoModelForCausalLM.from_pretrained(result.model_path).eval()
            rows.append((LABELS[name], perplexity(student, tokenizer, held_text),
                         teacher_nll_of_samples(student, teacher, tokenizer, held_prompts), seconds))
            print(json.dumps({"method": name, "ppl": rows[-1][1], "teacher_nll": rows[-1][2], "s": seconds}),
                  flush=True)
    print()
    print(f"{'method':<40} {'held-out ppl':>12} {'teacher NLL':>12} {'train s':>8}")
    for label, ppl, nll, seconds in rows:
        print(f"{label:<40} {ppl:>12.3f} {nll:>12.3f} {'' if seconds is None else f'{seconds:.1f}':>8}")
    print(f"\nsame teacher, data (480 prompt/completion pairs), student start and optimizer steps "
          f"({args.epochs} epochs × 30 batches of 16); teacher NLL = the teacher's per-token NLL of the "
          "student's own samples on 80 held-out prompts (the teacher's row: of its own samples)")


if __name__ == "__main__":
    main()
