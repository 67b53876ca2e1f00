"""The teacher-signal store (distill/teacher_cache.py): a causal-LM top-k job's teacher time
without a cache, on its first run (miss), and on a repeat job (hit), plus the store's size and
its reconstruction error.

One random-init GPT-2 teacher over a word-level vocabulary of ``--vocab`` made-up words (no
downloads; its embedding, tied to the head, is scaled by ``--logit-scale`` so its next-token
distributions are peaked like a trained model's instead of near-uniform), random sentences of
those words (``--rows`` documents, packed into rows of ``--seq-len``), a derived 1-layer student.
Each variant is a real ``run_distillation`` call, stopped right after the recipe's
``teacher_signal()``; the time shown is that method's wall time:

  off            no cache: the teacher runs (precompute_topk), float32 signal in memory
  first (miss)   an empty cache, the process's weight-hash memo cleared: hash the teacher's
                 weight files and the tokens, run the teacher, encode, write, decode
  repeat (hit)   the same job again: hash the tokens (weights: memoized), read, decode

Error: the decoded (stored) signal against the fresh float32 one, on the probabilities:
max and mean |p − p̂|, and the max relative to the position's top-1 probability.

Run:  .venv/bin/python benchmarks/bench_teacher_cache.py                      # ~1 min on a quiet 2-core CPU
      .venv/bin/python benchmarks/bench_teacher_cache.py --vocab 32000 --rows 512 --layers 6 --embd 384
      .venv/bin/python benchmarks/bench_teacher_cache.py --device cuda --vocab 50257 --layers 12 --embd 768 --rows 4096
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import teacher_cache as tc  # noqa: E402
from distill.recipes.causal_lm import CausalLMToken  # noqa: E402
from distill.spec import JobSpec  # noqa: E402
from distill.teacher_cache import TeacherCache  # noqa: E402
from distill.train import run_distillation  # noqa: E402
from tests.distill.hf_factories import make_word_tokenizer, save_model_dir, tiny_gpt2  # noqa: E402


class _Done(Exception):
    pass


def _timed_signal(record: dict):
    real = CausalLMToken.teacher_signal

    def wrapper(self):
        start = time.perf_counter()
        signal = real(self)
        record["seconds"] = time.perf_counter() - start
        record["signal"] = signal
        raise _Done

    return wrapper


def run_variant(spec, out: Path, cache, device: str) -> dict:
    record, events = {}, []
    original = CausalLMToken.teacher_signal
    CausalLMToken.teacher_signal = _timed_signal(record)
    try:
        run_distillation(spec, out, device=device, teacher_cache=cache,
                         on_event=lambda kind, data: events.append((kind, data)))
    except _Done:
        pass
    finally:
        CausalLMToken.teacher_signal = original
    record["event"] = next((d for k, d in events if k == "teacher_signal"), {})
    return record


def errors(fresh, decoded) -> tuple[float, float, float]:
    p, q = fresh.logprobs.exp(), decoded.logprobs.exp()
    diff = (p - q).abs()
    return float(diff.max()), float(diff.mean()), float((diff / p[..., :1]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=256, help="documents (about seq-len words each)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--logit-scale", type=float, default=3.0,
                        help="3: mean top-1 probability ~0.4, like a trained LM; 8+: near one-hot")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-teacher-cache-"))
    words = [f"w{i}" for i in range(args.vocab - 3)]  # + <unk> <pad> <eos>
    tokenizer = make_word_tokenizer(words)
    torch.manual_seed(0)
    teacher = tiny_gpt2(tokenizer, n_layer=args.layers, n_embd=args.embd, n_head=4, n_positions=args.seq_len)
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(args.logit_scale)
    teacher_dir = save_model_dir(teacher, tokenizer, work / "teacher")
    rng = random.Random(0)
    zipf = [1 / (i + 1) for i in range(len(words))]
    texts = [" ".join(rng.choices(words, weights=zipf, k=args.seq_len - 1)) for _ in range(args.rows)]
    (work / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = JobSpec.from_dict({
        "task": "causal_lm", "teacher": {"path": str(teacher_dir)}, "student": {"derive": {"num_layers": 1}},
        "training_file": str(work / "train.jsonl"), "validation_split": 0.1,
        "data": {"max_length": args.seq_len}, "teacher_signal": {"top_k": args.k},
        "hyperparameters": {"epochs": 1, "batch_size": 16, "temperature": args.temperature}})
    weights_bytes = sum(p.stat().st_size for p in teacher_dir.glob("*.safetensors"))

    times = {"off": [], "first (miss)": [], "repeat (hit)": []}
    last = {}
    for repeat in range(args.repeats):
        times["off"].append((off := run_variant(spec, work / f"off{repeat}", None, args.device))["seconds"])
        tc._memo.clear()
        cache = TeacherCache(work / f"cache{repeat}", 1 << 40)
        miss = run_variant(spec, work / f"miss{repeat}", cache, args.device)
        hit = run_variant(spec, work / f"hit{repeat}", cache, args.device)
        assert miss["event"]["cache"] == "miss" and hit["event"]["cache"] == "hit"
        times["first (miss)"].append(miss["seconds"])
        times["repeat (hit)"].append(hit["seconds"])
        last = {"off": off, "miss": miss, "hit": hit}

    event = last["hit"]["event"]
    positions = event["positions"]
    print(f"teacher: GPT-2 {args.layers} layers × {args.embd}, {weights_bytes / 2**20:.1f} MiB of weights; "
          f"vocab {args.vocab}; {positions} token positions; k={event['top_k']}; T={args.temperature}; "
          f"device {args.device}; {args.repeats} repeats (median, min–max)")
    base = statistics.median(times["off"])
    print(f"\n{'variant':<16}{'teacher_signal() s':>22}{'vs off':>10}{'vs first':>10}")
    first = statistics.median(times["first (miss)"])
    for name, values in times.items():
        median = statistics.median(values)
        spread = f"{median:.3f} ({min(values):.3f}–{max(values):.3f})"
        print(f"{name:<16}{spread:>22}{median / base:>10.3f}{median / first:>10.3f}")
    print(f"\n{'store':<34}{'bytes/token':>12}")
    print(f"{'in memory (float32 + int32 ids)':<34}{event['bytes_per_token']:>12}")
    print(f"{'stored (file size / positions)':<34}{event['cache_bytes_per_token']:>12}")
    print(f"{'formula k(1 + id bytes) + 12':<34}{tc.encoded_bytes_per_token(event['top_k'], args.vocab):>12}")
    fresh, decoded = last["off"]["signal"], last["hit"]["signal"]
    same_ids = torch.equal(fresh.indices.long(), decoded.indices.long())
    max_abs, mean_abs, max_rel = errors(fresh, decoded)
    print(f"\nteacher signal: mean top-1 probability {float(fresh.logprobs[..., 0].exp().mean()):.3f}, mean tail "
          f"mass {float(fresh.tail_logprob.exp().mean()):.3f}, mean gap top-1 − top-k "
          f"{float((fresh.logprobs[..., 0] - fresh.logprobs[..., -1]).mean()):.1f} nats")
    print(f"reconstruction vs the fresh signal: max |p − p̂| {max_abs:.2e}, mean {mean_abs:.2e}, "
          f"max relative to p_top1 {max_rel:.2e}; ids identical: {same_ids}; "
          f"tail identical: {torch.equal(fresh.tail_logprob, decoded.tail_logprob)}")
    miss_decoded = last["miss"]["signal"]
    print("miss and hit train from identical tensors:",
          torch.equal(miss_decoded.logprobs, decoded.logprobs) and torch.equal(miss_decoded.indices, decoded.indices))


if __name__ == "__main__":
    main()
