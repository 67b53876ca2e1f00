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

Error: the decoded (stored) signal against the fresh float32 one, entry by entry (matched by token
id: the decoded entries come in ascending id order), on the probabilities: max and mean |p − p̂|,
the max relative to the position's top-1 probability, and KL(fresh ‖ decoded) over the k entries
plus the tail bucket (both renormalised), mean and max over positions.

Format section (no model): the same figures for next-token distributions made directly as logits,
for GPT-2-sized vocabularies a small random teacher cannot reach on a CPU quickly:
  random     Gaussian logits × 3 (a random-weight GPT-2's head: top-k ids spread uniformly over
             the vocabulary, the ids' costliest case)
  zipf       a Zipfian frequency prior −log(rank) (token id = frequency rank, as in BPE vocabularies)
             + Gaussian noise × 2 + three context peaks per position: realistic-ish LM distributions
             whose likely tokens cluster at low ids
plus decode speed on --decode-positions synthetic positions.

Full-vocabulary section: the float16 store (2·V bytes per token) for the teacher's logits of the
first --full-rows rows: write time, and reading one batch of rows vs the teacher's forward pass
on it.

Run:  .venv/bin/python benchmarks/bench_teacher_cache.py                      # ~2 min on a quiet 2-core CPU
      .venv/bin/python benchmarks/bench_teacher_cache.py --vocab 32000 --rows 512 --layers 6 --embd 384
      .venv/bin/python benchmarks/bench_teacher_cache.py --device cuda --vocab 50257 --layers 12 --embd 768 --rows 4096
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _summary  # noqa: E402

from distill import teacher_cache as tc  # noqa: E402
from distill.losses import TopKSignal, teacher_topk  # noqa: E402
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


def errors(fresh, decoded) -> dict:
    """|p − p̂| (max, mean, max relative to p_top1) and KL(fresh ‖ decoded) over the k entries + the tail."""
    ids, order = fresh.indices.long().sort(-1)
    decoded_ids, decoded_order = decoded.indices.long().sort(-1)
    assert torch.equal(ids, decoded_ids), "the stored ids differ from the fresh ones"
    p = fresh.logprobs.double().gather(-1, order).exp()
    q = decoded.logprobs.double().gather(-1, decoded_order).exp()
    diff = (p - q).abs()
    tail = fresh.tail_logprob.double().exp().unsqueeze(-1)
    full_p = torch.cat([p, tail], -1)
    full_q = torch.cat([q, decoded.tail_logprob.double().exp().unsqueeze(-1)], -1)
    full_p, full_q = full_p / full_p.sum(-1, keepdim=True), full_q / full_q.sum(-1, keepdim=True)
    kl = torch.where(full_p > 0, full_p * (full_p.log() - full_q.log()), torch.zeros_like(full_p)).sum(-1)
    p_top = fresh.logprobs.double().amax(-1, keepdim=True).exp()
    return {"max": float(diff.max()), "mean": float(diff.mean()), "rel": float((diff / p_top).max()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def zipf_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32)) + 2 * torch.randn(rows, vocab,
                                                                                          generator=generator)
    peaks = torch.randint(0, vocab, (rows, 3), generator=generator)
    return logits.scatter_add_(1, peaks, 8 * torch.rand(rows, 3, generator=generator))


def format_rows(k: int, positions: int) -> list[tuple]:
    rows = []
    for vocab in (50_257, 65_536, 151_936):
        for name in ("random", "zipf"):
            generator = torch.Generator().manual_seed(vocab)
            logits = (torch.randn(positions, vocab, generator=generator) * 3 if name == "random"
                      else zipf_logits(positions, vocab, seed=vocab))
            fresh = teacher_topk(logits, k, 1.0)
            del logits
            encoded = tc.encode_signal(fresh, vocab)
            size = sum(t.numel() * t.element_size() for t in encoded.values())
            ids = encoded["ids_low"].numel() + encoded["ids_high"].numel()
            rows.append((name, vocab, size / positions, ids / positions, tc.stored_levels(encoded),
                         tc.bytes_per_token_bound(k, vocab), errors(fresh, tc.decode_signal(encoded))))
    return rows


def decode_speed(k: int, positions: int, vocab: int = 50_257) -> tuple[float, float, float]:
    """(encode s, decode s, bytes/token) for a synthetic signal with ids spread like a random teacher's."""
    generator = torch.Generator().manual_seed(0)
    gaps = (torch.rand(positions, k, generator=generator).log().neg() * (vocab / k / 1.1)).long()
    ids = (torch.cumsum(gaps.clamp(max=vocab // k - 1) + 1, -1) - 1).to(torch.int32)
    logprobs = torch.sort(-8 * torch.rand(positions, k, generator=generator), descending=True).values - 1
    signal = TopKSignal(logprobs, ids, torch.full((positions,), -0.5))
    start = time.perf_counter()
    encoded = tc.encode_signal(signal, vocab)
    middle = time.perf_counter()
    tc.decode_signal(encoded)
    end = time.perf_counter()
    return middle - start, end - middle, sum(t.numel() * t.element_size() for t in encoded.values()) / positions


@torch.no_grad()
def full_store(teacher, tokenizer, texts: list[str], seq_len: int, work: Path, rows: int, batch: int) -> dict:
    """The teacher's logits for the first ``rows`` documents through the full-vocabulary store: the
    teacher's forward per batch, writing them, and reading one batch back (``FullLogits.rows``)."""
    encoded = tokenizer(texts[:rows], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    vocab = teacher.config.vocab_size
    cache = TeacherCache(work / "full-cache", 1 << 40)
    writer = cache.open_full("bench", (rows, seq_len, vocab), {"k": "full"})
    forward = write = 0.0
    for start in range(0, rows, batch):
        began = time.perf_counter()
        logits = teacher(input_ids=ids[start:start + batch], attention_mask=mask[start:start + batch]).logits
        middle = time.perf_counter()
        writer.write(start, logits)
        forward, write = forward + middle - began, write + time.perf_counter() - middle
    began = time.perf_counter()
    entry = writer.commit()
    commit = time.perf_counter() - began
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:batch]
    reads = []
    for _ in range(3):
        began = time.perf_counter()
        block = entry.rows(order)
        reads.append(time.perf_counter() - began)
    expected = teacher(input_ids=ids[order], attention_mask=mask[order]).logits.to(torch.float16)
    return {"rows": rows, "batches": -(-rows // batch), "forward": forward, "write": write, "commit": commit,
            "read": statistics.median(reads), "bytes": entry.nbytes, "positions": rows * seq_len,
            "exact": torch.equal(block, expected), "batch": batch}


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
    parser.add_argument("--format-positions", type=int, default=2048)
    parser.add_argument("--decode-positions", type=int, default=200_000)
    parser.add_argument("--full-rows", type=int, default=64, help="rows through the full-vocabulary store; 0: skip")
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
    k = event["top_k"]
    print(f"teacher: GPT-2 {args.layers} layers × {args.embd}, {weights_bytes / 2**20:.1f} MiB of weights; "
          f"vocab {args.vocab}; {positions} token positions; k={k}; T={args.temperature}; "
          f"device {args.device}; {args.repeats} repeats (median, min–max)")
    base = statistics.median(times["off"])
    print(f"\n{'variant':<16}{'teacher_signal() s':>22}{'vs off':>10}{'vs first':>10}")
    first = statistics.median(times["first (miss)"])
    for name, values in times.items():
        median = statistics.median(values)
        spread = f"{median:.3f} ({min(values):.3f}–{max(values):.3f})"
        print(f"{name:<16}{spread:>22}{median / base:>10.3f}{median / first:>10.3f}")
    hit_ratio = statistics.median(times["repeat (hit)"]) / first
    stored = event["cache_bytes_per_token"]
    print(f"\n{'store':<44}{'bytes/token':>12}")
    print(f"{'in memory (float32 + int32 ids)':<44}{event['bytes_per_token']:>12}")
    print(f"{'stored (file size / positions)':<44}{stored:>12}")
    print(f"{'goal':<44}{'≤ 150':>12}")
    print(f"{'target 10 + ⌈17.5·k/8⌉':<44}{tc.target_bytes_per_token(k):>12}")
    print(f"{'bound for any signal at this k and vocab':<44}{tc.bytes_per_token_bound(k, args.vocab):>12.1f}")
    fresh, decoded = last["off"]["signal"], last["hit"]["signal"]
    err = errors(fresh, decoded)
    print(f"\nteacher signal: mean top-1 probability {float(fresh.logprobs[..., 0].exp().mean()):.3f}, mean tail "
          f"mass {float(fresh.tail_logprob.exp().mean()):.3f}, mean gap top-1 − top-k "
          f"{float((fresh.logprobs[..., 0] - fresh.logprobs[..., -1]).mean()):.1f} nats")
    print(f"reconstruction vs the fresh signal: max |p − p̂| {err['max']:.2e}, mean {err['mean']:.2e}, "
          f"max relative to p_top1 {err['rel']:.2e}; KL(fresh ‖ decoded) mean {err['kl_mean']:.2e}, "
          f"max {err['kl_max']:.2e}; ids identical (as sets): yes; "
          f"tail identical: {torch.equal(fresh.tail_logprob, decoded.tail_logprob)}")
    miss_decoded = last["miss"]["signal"]
    print("miss and hit train from identical tensors:",
          torch.equal(miss_decoded.logprobs, decoded.logprobs) and torch.equal(miss_decoded.indices, decoded.indices))

    print(f"\nformat, k={k}, {args.format_positions} positions of synthetic logits (no model):")
    print(f"{'logits':<8}{'vocab':>8}{'B/token':>9}{'ids B':>7}{'levels':>8}{'bound':>7}{'max|dp|':>10}"
          f"{'mean|dp|':>10}{'max rel':>9}{'KL mean':>10}{'KL max':>10}")
    worst = 0.0
    for name, vocab, per_token, ids, levels, bound, e in format_rows(k, args.format_positions):
        worst = max(worst, per_token) if vocab <= 65_536 else worst
        print(f"{name:<8}{vocab:>8}{per_token:>9.1f}{ids:>7.1f}{levels:>8}{bound:>7.1f}{e['max']:>10.2e}"
              f"{e['mean']:>10.2e}{e['rel']:>9.2e}{e['kl_mean']:>10.2e}{e['kl_max']:>10.2e}")
    encode_s, decode_s, speed_bytes = decode_speed(k, args.decode_positions)
    print(f"speed: {args.decode_positions} positions (V=50257, {speed_bytes:.1f} B/token): encode {encode_s:.2f} s, "
          f"decode {decode_s:.2f} s = {args.decode_positions / decode_s / 1e6:.2f} M positions/s "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")

    if args.full_rows:
        full = full_store(teacher, tokenizer, texts, args.seq_len, work, min(args.full_rows, args.rows),
                          spec.hyperparameters.batch_size)
        per_batch = full["forward"] / full["batches"]
        print(f"\nfull vocabulary, float16: {full['positions']} positions × V={args.vocab} = "
              f"{full['bytes'] / 2**20:.0f} MiB ({2 * args.vocab} B/token); teacher forward "
              f"{per_batch:.3f} s/batch of {full['batch']}, write {full['write'] / full['batches']:.3f} s/batch, "
              f"commit (fsync + rename) {full['commit']:.2f} s; read one batch (random rows) {full['read']:.3f} s "
              f"= {full['read'] / per_batch:.2f}× the forward; read back equals the float16 cast: {full['exact']}")

    _summary.record("teacher cache: repeat-job teacher time", f"{statistics.median(times['repeat (hit)']):.2f} s",
                    f"first job {first:.2f} s", hit_ratio, "≤ 0.05", hit_ratio <= 0.05)
    _summary.record(f"teacher cache: top-{k} bytes/token (V={args.vocab})", f"{stored} B",
                    f"format 1: {k * (2 + (args.vocab > 256) + (args.vocab > 65_536)) + 12} B", stored / 150, "≤ 150",
                    stored <= 150)
    _summary.record(f"teacher cache: top-{k} bytes/token, V ≤ 65536 (worst measured)", f"{worst:.1f} B",
                    "goal 150 B", worst / 150, "≤ 150", worst <= 150)


if __name__ == "__main__":
    main()
