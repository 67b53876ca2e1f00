"""Batched generation (app/services/generation.py): rows decoded together, with left padding and one
KV cache, give what each row gives alone — greedy token ids, seeded samples, log-probabilities — each
row keeps its own max_tokens, EOS and cancellation, the batcher really batches, and its queue is
bounded. Then the same through the live service: concurrent completions equal sequential ones.

The in-process tests use tiny random Llama models (untied head: their greedy continuations vary and
reach EOS) with prompts of different lengths, so left padding matters. On these models no greedy
step is a near-tie that float rounding from the padded shapes could flip (checked against
``generate`` run one prompt at a time)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from app.errors import Unavailable
from app.services.generation import GenerationBatcher, Row, RowSpec, ServedLM, decode
from tests.distill.hf_factories import SYNTHETIC_WORDS, make_word_tokenizer, tiny_gpt2, tiny_llama

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer(SYNTHETIC_WORDS)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    if request.param == "llama":
        return tiny_llama(tokenizer, seed=1)
    gpt2 = tiny_gpt2(tokenizer, seed=1, n_layer=2)
    gpt2.lm_head.weight = torch.nn.Parameter(0.1 * torch.randn_like(gpt2.lm_head.weight))  # untied: outputs vary
    return gpt2


def run(model, tokenizer, specs: list[RowSpec], cancelled: set[int] = frozenset()) -> list[list]:
    rows = [Row(spec) for spec in specs]
    for i in cancelled:
        rows[i].cancel()
    decode(model, rows, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return [list(row.steps()) for row in rows]


def tokens(steps) -> list[int]:
    return [step.token for step in steps]


def test_greedy_batched_equals_alone_and_generate(model, tokenizer):
    specs = [RowSpec(prompt, 12) for prompt in PROMPTS]
    batched = [tokens(steps) for steps in run(model, tokenizer, specs)]
    alone = [tokens(run(model, tokenizer, [spec])[0]) for spec in specs]
    assert batched == alone
    for prompt, row in zip(PROMPTS, alone):
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert row == reference[0, len(prompt):].tolist()
    assert len({tuple(row) for row in batched}) == len(batched)  # the rows really differ


def test_seeded_samples_are_the_same_batched_or_alone(model, tokenizer):
    seeded = RowSpec(PROMPTS[2], 10, temperature=1.3, top_p=0.9, seed=7)
    alone = tokens(run(model, tokenizer, [seeded])[0])
    neighbours = [RowSpec(PROMPTS[0], 4, temperature=0.7), RowSpec(PROMPTS[3], 10), RowSpec(PROMPTS[1], 10,
                                                                                                temperature=1.0, seed=8)]
    batched = run(model, tokenizer, [neighbours[0], seeded, *neighbours[1:]])
    assert tokens(batched[1]) == alone
    other_seed = tokens(run(model, tokenizer, [RowSpec(PROMPTS[2], 10, temperature=1.3, top_p=0.9, seed=8)])[0])
    assert other_seed != alone


def test_each_row_keeps_its_max_tokens_and_cancellation(model, tokenizer):
    specs = [RowSpec(PROMPTS[0], 3), RowSpec(PROMPTS[1], 9), RowSpec(PROMPTS[2], 9), RowSpec(PROMPTS[3], 1)]
    out = run(model, tokenizer, specs, cancelled={2})
    assert [len(steps) for steps in out] == [3, 9, 1, 1]  # a cancelled row ends after the step in flight
    full = [tokens(run(model, tokenizer, [RowSpec(p, 9)])[0]) for p in PROMPTS]
    assert tokens(out[0]) == full[0][:3] and tokens(out[1]) == full[1] and tokens(out[3]) == full[3][:1]


def test_rows_admitted_mid_batch_equal_alone(model, tokenizer):
    """Continuous batching: rows handed over between steps join the running batch (their cache left-padded
    to the running one's, or the running one's to theirs), and leave it, without changing any row's tokens."""
    first = [RowSpec(PROMPTS[3], 3), RowSpec(PROMPTS[1], 10)]  # the long prompt leaves early: its padding is cut
    waves = [[RowSpec(PROMPTS[0], 6, temperature=1.2, seed=3)], [], [RowSpec(PROMPTS[2], 8), RowSpec(PROMPTS[3], 5)]]
    rows, admitted, steps = [Row(spec) for spec in first], [], []

    def admit(running: int) -> list[Row]:
        wave = [Row(spec) for spec in waves[len(admitted)]] if len(admitted) < len(waves) else []
        admitted.append(running)
        rows.extend(wave)
        return wave

    hook = model.register_forward_pre_hook(lambda module, args, kwargs: steps.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        decode(model, list(rows), tokenizer.eos_token_id, tokenizer.pad_token_id, admit)
    finally:
        hook.remove()
    assert len(admitted) >= 3 and all(admitted[:3])  # handed over while other rows ran
    assert max(size for size, width in steps if width == 1) >= 3  # decode steps ran the joined rows together
    for row in rows:
        assert tokens(row.steps()) == tokens(run(model, tokenizer, [row.spec])[0])


def test_a_row_ends_at_eos_and_the_others_go_on(tokenizer):
    model = tiny_llama(tokenizer, seed=0)  # greedy from PROMPTS[2] reaches EOS before 12 tokens
    alone = [tokens(run(model, tokenizer, [RowSpec(p, 12)])[0]) for p in PROMPTS]
    ended = [i for i, row in enumerate(alone) if row[-1] == tokenizer.eos_token_id]
    assert ended and len(alone[ended[0]]) < 12
    batched = [tokens(steps) for steps in run(model, tokenizer, [RowSpec(p, 12) for p in PROMPTS])]
    assert batched == alone and any(len(row) == 12 for row in batched)


def test_logprobs_are_the_models_own_per_row(model, tokenizer):
    specs = [RowSpec(PROMPTS[0], 5, top_logprobs=3), RowSpec(PROMPTS[1], 5), RowSpec(PROMPTS[3], 5, top_logprobs=0)]
    out = run(model, tokenizer, specs)
    assert all(step.logprob is None and step.top is None for step in out[1])
    assert all(step.top == [] for step in out[2])
    for spec, steps in zip(specs, out):
        if spec.top_logprobs is None:
            continue
        generated = tokens(steps)
        with torch.no_grad():
            logits = model(torch.tensor([spec.prompt_ids + generated])).logits[0].float()
        expected = torch.log_softmax(logits[len(spec.prompt_ids) - 1:-1], dim=-1)
        assert torch.allclose(torch.tensor([s.logprob for s in steps]),
                              expected[torch.arange(len(generated)), torch.tensor(generated)], atol=1e-4)
        for step in steps:
            if spec.top_logprobs:
                assert len(step.top) == 3 and step.top[0][0] == step.token  # greedy: the best token
                assert step.top[0][1] >= step.top[1][1] >= step.top[2][1]


def served(model, tokenizer) -> ServedLM:
    return ServedLM("model-x:sha", model, tokenizer.eos_token_id, tokenizer.pad_token_id, threading.Lock())


def test_concurrent_requests_share_batches_and_get_their_own_rows(tokenizer):
    model = tiny_llama(tokenizer, seed=1)
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        batcher = GenerationBatcher(max_batch=8, max_wait_s=0.5, max_queue=64)
        target = served(model, tokenizer)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # one client per prompt, all at once
            results = list(pool.map(lambda p: tokens(batcher.submit(target, [RowSpec(p, 6)])[0].steps()), PROMPTS))
        assert max(sizes) > 1  # requests were decoded together
        assert results == [tokens(run(model, tokenizer, [RowSpec(p, 6)])[0]) for p in PROMPTS]
        assert batcher.waiting == 0
    finally:
        hook.remove()


def test_the_queue_is_bounded_with_503(tokenizer):
    model = tiny_llama(tokenizer, seed=1)
    target = served(model, tokenizer)
    batcher = GenerationBatcher(max_batch=1, max_wait_s=0, max_queue=2)
    accepted: list[Row] = []
    with target.lock:  # the worker blocks on its first batch: later rows stay queued
        with pytest.raises(Unavailable) as refused:
            for _ in range(4):
                accepted += batcher.submit(target, [RowSpec(PROMPTS[1], 2)])
        assert 2 <= len(accepted) <= 3 and batcher.waiting <= 2
    error = refused.value
    assert error.status == 503 and error.headers["Retry-After"] and "queue is full" in str(error.detail)
    assert all(len(list(row.steps())) == 2 for row in accepted)  # the accepted ones run once the lock is free
    big = batcher.submit(target, [RowSpec(PROMPTS[1], 1)] * 5)  # larger than the queue, but nothing waits: taken
    assert [len(list(row.steps())) for row in big] == [1] * 5


# ---- through the live service ------------------------------------------------------------------------------

SERVICE_PROMPTS = ["the cat", "the dogs see a big", "a", "every child likes the red bird and the", "some robots"]


def test_service_concurrent_completions_equal_sequential_ones(api_url, api_key, lm):
    def ask(body: dict) -> dict:
        with httpx.Client(base_url=api_url + "/v1", timeout=120,
                          headers={"Authorization": f"Bearer {api_key}"}) as http:
            response = http.post("/completions", json={"model": lm, "max_tokens": 8, **body})
            assert response.status_code == 200, response.text
            return response.json()

    bodies = [{"prompt": p, "temperature": 0} for p in SERVICE_PROMPTS]
    bodies += [{"prompt": "", "temperature": 0},  # starts from EOS (this tokenizer has no BOS)
               {"prompt": "the cat", "temperature": 1.0, "seed": 11, "n": 2},
               {"prompt": ["a", "the dogs"], "temperature": 0, "logprobs": 2}]
    sequential = [ask(body) for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(ask, bodies))
    for one, other in zip(sequential, concurrent):
        assert [c["text"] for c in one["choices"]] == [c["text"] for c in other["choices"]]
        assert one["usage"] == other["usage"]
    greedy = [r["choices"][0]["text"] for r in sequential[:len(SERVICE_PROMPTS)]]
    assert all(text.strip() for text in greedy) and len(set(greedy)) > 1
    assert sequential[len(SERVICE_PROMPTS)]["usage"]["prompt_tokens"] == 1
    seeded = sequential[len(SERVICE_PROMPTS) + 1]["choices"]
    assert seeded[0]["text"] != seeded[1]["text"]  # choice j samples with seed + j
    for one, other in zip(sequential[-1]["choices"], concurrent[-1]["choices"]):  # logprobs per row, batched or not
        assert one["logprobs"]["tokens"] == other["logprobs"]["tokens"] and one["logprobs"]["tokens"]
        assert one["logprobs"]["token_logprobs"] == pytest.approx(other["logprobs"]["token_logprobs"], abs=1e-4)
