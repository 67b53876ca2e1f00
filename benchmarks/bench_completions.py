"""/v1/completions tokens/s at C concurrent clients: batched generation vs one sequence at a time, one run.

Starts its own service on the embedded defaults (a scratch SQLite database, a local artifacts folder and
Celery's filesystem broker), builds a small random GPT-2 teacher in-process (a word-level vocabulary of
--vocab words, so EOS is one token among thousands), uploads it with some random-word text, trains a
student derived from its first layers with a worker (1 epoch) and stops the worker. It keeps the prompts
whose greedy continuation runs the full --tokens without EOS, then for each variant starts a fresh API
(one uvicorn process) and runs C closed-loop clients (each sends a greedy completion request of
--tokens new tokens, waits for the answer, sends the next) for D seconds:

- ``batched``: this checkout, DISTILL_GENERATE_MAX_BATCH=32, DISTILL_GENERATE_MAX_WAIT_MS=5 (the defaults)
- ``one-at-a-time``: this checkout with DISTILL_GENERATE_MAX_BATCH=1 (the same decode loop, one row per batch)
- ``HEAD``: the app/ and distill/ of ``--baseline-rev`` (default 43ebf61, the last commit before batched
  generation: one ``model.generate`` per request under the model's lock)

Each variant runs --repeats times, interleaved; the table shows each one's median-throughput run: completion
tokens/s (from each answer's ``usage``), requests/s, p50/p99 latency, and tokens/s as a ratio of
one-at-a-time's and of HEAD's. Greedy requests generate the same tokens in every variant (checked: the
texts of one request per prompt are compared). Goal (issue 9): batched >= 3x one-at-a-time's tokens/s at
16 concurrent clients.

    .venv/bin/python benchmarks/bench_completions.py [--clients 16] [--seconds 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
import _summary  # noqa: E402
from bench_predict import free_port, migrate_and_create_key, start, stop, train_on_stack, wait_healthy  # noqa: E402


def build_teacher(folder: Path, vocab: int, layers: int, width: int) -> tuple[Path, Path, list[str]]:
    """(teacher archive, training JSONL, words): a random GPT-2 over ``vocab`` words and random-word text."""
    from tests.distill.hf_factories import make_word_tokenizer, save_model_dir, tiny_gpt2
    from tests.factories import tar_dir, write_jsonl

    words = [f"w{i}" for i in range(vocab)]
    tokenizer = make_word_tokenizer(words)
    teacher = tiny_gpt2(tokenizer, n_layer=layers, n_embd=width, n_head=4, n_positions=128, seed=0)
    teacher_dir = save_model_dir(teacher, tokenizer, folder / "teacher")
    rng = random.Random(0)
    texts = [{"text": " ".join(rng.choices(words, k=40))} for _ in range(64)]
    return tar_dir(teacher_dir, folder / "teacher.tar.gz"), write_jsonl(folder / "train.jsonl", texts), words


def train_student(env: dict, scratch: Path, args) -> tuple[str, str, list[str]]:
    """(model id, API key, words): a student derived from the teacher's first layers, trained 1 epoch."""
    key = migrate_and_create_key(env)
    archive, train, words = build_teacher(scratch / "problem", args.vocab, args.teacher_layers, args.width)
    model_id = train_on_stack(
        env, scratch, key, {"teacher": (archive, "model"), "train": (train, "dataset")},
        lambda ids: {"task": "causal_lm", "teacher": {"file_id": ids["teacher"]},
                     "student": {"derive": {"num_layers": args.student_layers}}, "training_file": ids["train"],
                     "hyperparameters": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-4},
                     "data": {"max_length": 48}}, 600)
    return model_id, key, words


async def _post(reader, writer, host: str, key: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive POST /v1/completions on an open connection (a minimal client: the load
    generator shares the CPUs with the server, so it should cost little)."""
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


def _body(model_id: str, prompt: str, tokens: int) -> bytes:
    return json.dumps({"model": model_id, "prompt": prompt, "max_tokens": tokens, "temperature": 0}).encode()


async def load(url: str, key: str, model_id: str, prompts: list[str], args) -> dict:
    host, port = url.removeprefix("http://").split(":")
    bodies = [_body(model_id, prompt, args.tokens) for prompt in prompts]
    reader, writer = await asyncio.open_connection(host, int(port))
    texts = {}
    for n, body in enumerate(bodies):  # warm up (the model loads); each prompt's text, to compare variants
        status, answer = await _post(reader, writer, url, key, body)
        assert status == 200, answer
        texts[n] = json.loads(answer)["choices"][0]["text"]
    writer.close()
    latencies: list[float] = []
    counts = {"tokens": 0, "errors": 0}
    stop_at = time.perf_counter() + args.seconds

    async def client(n: int):
        reader, writer = await asyncio.open_connection(host, int(port))
        i = n
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            status, answer = await _post(reader, writer, url, key, bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - began)
            if status == 200:
                counts["tokens"] += json.loads(answer)["usage"]["completion_tokens"]
            else:
                counts["errors"] += 1
            i += args.clients
        writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(args.clients)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return {"tps": counts["tokens"] / elapsed, "rps": len(latencies) / elapsed, "p50": pick(0.50),
            "p99": pick(0.99), "n": len(latencies), "errors": counts["errors"], "texts": texts}


def pick_prompts(url: str, key: str, model_id: str, words: list[str], args) -> list[str]:
    """Prompts (3 to 12 words: different lengths, so batches are left-padded) whose greedy continuation
    runs the full --tokens without EOS."""
    rng = random.Random(1)
    chosen = []
    with httpx.Client(base_url=url + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        for _ in range(200):
            prompt = " ".join(rng.choices(words, k=rng.randint(3, 12)))
            answer = http.post("/completions", content=_body(model_id, prompt, args.tokens),
                               headers={"Content-Type": "application/json"}).json()
            if answer["usage"]["completion_tokens"] == args.tokens and answer["choices"][0]["finish_reason"] == "length":
                chosen.append(prompt)
            if len(chosen) == args.clients:
                break
    if not chosen:
        raise SystemExit("no prompt ran the full --tokens without EOS; try another --vocab")
    return chosen


def serve(cwd: Path, env: dict, log: Path, work):
    """Start an API (one uvicorn process), return ``work(url)``, stop the API."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "120"], env, cwd, log)
    try:
        wait_healthy(url, api, log)
        return work(url)
    finally:
        stop(api)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["HEAD", "one-at-a-time", "batched"])
    parser.add_argument("--baseline-rev", default="43ebf61",
                        help="the commit whose app/ and distill/ are 'HEAD' (default: before batched generation)")
    parser.add_argument("--vocab", type=int, default=4000, help="words in the vocabulary")
    parser.add_argument("--width", type=int, default=128, help="hidden size of teacher and student")
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-completions-"))
    env = {**os.environ, "DISTILL_DATABASE_URL": f"sqlite:///{scratch}/distill.db",
           "DISTILL_BROKER_URL": "filesystem://", "DISTILL_ARTIFACTS_DIR": str(scratch / "var" / "artifacts"),
           "DISTILL_DEVICE": "cpu", "DISTILL_QUEUE": "bench-completions", "PYTHONUNBUFFERED": "1"}
    for name in ("DISTILL_GENERATE_MAX_BATCH", "DISTILL_GENERATE_MAX_WAIT_MS", "DISTILL_GENERATE_MAX_QUEUE"):
        env.pop(name, None)
    try:
        model_id, key, words = train_student(env, scratch, args)
        head = scratch / "head"
        head.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline_rev, "app", "distill"], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(head)], input=archive, check=True)
        variants = {
            "HEAD": (head, {**env, "PYTHONPATH": str(head)}),
            "one-at-a-time": (ROOT, {**env, "DISTILL_GENERATE_MAX_BATCH": "1"}),
            "batched": (ROOT, {**env, "DISTILL_GENERATE_MAX_BATCH": "32", "DISTILL_GENERATE_MAX_WAIT_MS": "5"}),
        }
        prompts = serve(ROOT, env, scratch / "prompts.log", lambda url: pick_prompts(url, key, model_id, words, args))
        print(f"  {len(prompts)} prompts of {min(len(p.split()) for p in prompts)}-"
              f"{max(len(p.split()) for p in prompts)} words run {args.tokens} tokens greedily", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in args.variants}
        for repeat in range(args.repeats):  # interleaved, so a change in the machine's load hits every variant
            for name in args.variants:
                cwd, variant_env = variants[name]
                r = serve(cwd, variant_env, scratch / f"{name}.log",
                          lambda url: asyncio.run(load(url, key, model_id, prompts, args)))
                runs[name].append(r)
                print(f"  [{repeat + 1}/{args.repeats}] {name}: {r['tps']:.0f} tokens/s, {r['rps']:.1f} req/s, "
                      f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms ({r['n']} requests, {r['errors']} errors)",
                      flush=True)
        texts = {name: rs[0]["texts"] for name, rs in runs.items()}
        same = all(t == next(iter(texts.values())) for t in texts.values())
        results = {name: sorted(rs, key=lambda r: r["tps"])[len(rs) // 2] for name, rs in runs.items()}
        single = results.get("one-at-a-time", {}).get("tps")
        base = results.get("HEAD", {}).get("tps")
        print(f"\n/v1/completions, student GPT-2 {args.student_layers}x{args.width} over {args.vocab + 3} tokens, "
              f"{args.clients} concurrent clients, {args.tokens} greedy tokens per request, {args.seconds:g} s each, "
              f"{os.cpu_count()} CPUs; same texts in every variant: {same}")
        print(f"{'variant':<14} {'tokens/s':>9} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
              f"{'x 1-at-a-time':>14} {'x HEAD':>7}")
        for name, r in results.items():
            vs_single = f"{r['tps'] / single:.2f}" if single else "-"
            vs_head = f"{r['tps'] / base:.2f}" if base else "-"
            print(f"{name:<14} {r['tps']:>9.0f} {r['rps']:>7.1f} {r['p50']:>8.0f} {r['p99']:>8.0f} {r['errors']:>7} "
                  f"{vs_single:>14} {vs_head:>7}")
        if single and "batched" in results:
            ratio = results["batched"]["tps"] / single
            print(f"goal: batched >= 3x one-at-a-time's tokens/s at {args.clients} clients ({ratio:.2f}x)")
            _summary.record(f"completions tokens/s at {args.clients} clients",
                            f"batched {results['batched']['tps']:.0f} tokens/s",
                            f"one-at-a-time {single:.0f} tokens/s", ratio, ">= 3x one-at-a-time", ratio >= 3)
    finally:
        if args.keep:
            print(f"scratch folder: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
