"""The teacher-signal store shared across jobs (distill/teacher_cache.py): content keys, the
compressed format, LRU eviction under a byte budget, and causal-LM jobs that hit it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distill.losses import teacher_topk
from distill.losses.token import LOG_PROB_FLOOR
from distill.recipes import causal_lm
from distill.spec import JobSpec
from distill.teacher_cache import (GAP_CAP, LEVEL_LADDER, MAX_LEVELS, MIN_LEVELS, TeacherCache, bytes_per_token_bound,
                                   decode_signal, encode_signal, prob_error_bound, stored_levels,
                                   target_bytes_per_token)
from distill.train import run_distillation
from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language,
                                        tiny_gpt2)


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer(SYNTHETIC_WORDS)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    return save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), tokenizer,
                          tmp_path_factory.mktemp("teacher") / "t")


def _spec(tmp_path, teacher_dir, texts_seed=0, top_k=8, temperature=2.0, max_length=32) -> JobSpec:
    texts = [" ".join(synthetic_language(4, seed=texts_seed + i)) for i in range(24)]
    data = tmp_path / f"train-{texts_seed}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return JobSpec.from_dict({
        "task": "causal_lm", "teacher": {"path": str(teacher_dir)}, "student": {"derive": {"num_layers": 1}},
        "training_file": str(data), "validation_split": 0.25, "data": {"max_length": max_length},
        "teacher_signal": {"top_k": top_k},
        "hyperparameters": {"epochs": 1, "batch_size": 8, "temperature": temperature, "alpha": 0.5}})


def _logits(rows=200, vocab=1000, seed=0, spread=4.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * spread


def _zipf_logits(rows=256, vocab=50_257, seed=0):
    """Realistic-ish next-token logits: a Zipfian frequency prior (token id = frequency rank, as in BPE
    vocabularies) plus per-position noise and a few context-driven peaks."""
    generator = torch.Generator().manual_seed(seed)
    logits = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32)) + 2 * torch.randn(rows, vocab,
                                                                                          generator=generator)
    peaks = torch.randint(0, vocab, (rows, 3), generator=generator)
    return logits.scatter_add_(1, peaks, 8 * torch.rand(rows, 3, generator=generator))


def _by_id(signal):
    """(ids, probabilities) with each position's entries in ascending id order (the decoded order)."""
    ids, order = signal.indices.long().sort(dim=-1)
    return ids, signal.logprobs.double().gather(-1, order).exp()


def _prob_errors(signal, decoded):
    """(|p − p̂|, |p − p̂| / p_top), entry by entry, after checking both hold the same ids."""
    ids, p = _by_id(signal)
    decoded_ids, q = _by_id(decoded)
    assert torch.equal(ids, decoded_ids)  # the ids are exact
    p_top = signal.logprobs.double().amax(-1, keepdim=True).exp()
    return (p - q).abs(), (p - q).abs() / p_top


def _round_trip(signal, vocab, **kwargs):
    encoded = encode_signal(signal, vocab, **kwargs)
    return encoded, decode_signal(encoded)


# ---- the stored format ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spread", [1.0, 4.0, 12.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reconstruction_error_is_within_the_stated_bound(spread, temperature):
    signal = teacher_topk(_logits(spread=spread), 64, temperature)
    encoded, decoded = _round_trip(signal, 1000)
    assert stored_levels(encoded) == MAX_LEVELS  # a 1000-token vocabulary leaves room for the finest values
    absolute, relative = _prob_errors(signal, decoded)
    assert float(relative.max()) <= prob_error_bound(MAX_LEVELS) < 0.011
    assert float(absolute.mean()) < 1e-3
    assert torch.equal(decoded.logprobs.amax(-1), signal.logprobs[..., 0])  # the top-1 is exact
    assert torch.equal(decoded.tail_logprob, signal.tail_logprob)  # the tail is exact
    assert decoded.logprobs.dtype == torch.float32 and decoded.indices.dtype == torch.int32
    assert decoded.shape == signal.shape and decoded.k == 64


@pytest.mark.parametrize("target", [150, 120, 100, 90])
def test_a_smaller_target_takes_coarser_levels_within_their_bound(target):
    """Rate control: the encoder takes the finest levels whose values fit the target; the error bound
    follows the levels it took."""
    signal = teacher_topk(_logits(rows=256, vocab=50_257, seed=3, spread=3.0), 64, 1.0)
    encoded, decoded = _round_trip(signal, 50_257, target=target)
    levels = stored_levels(encoded)
    stored = sum(t.numel() * t.element_size() for t in encoded.values())
    assert levels in LEVEL_LADDER
    assert stored <= target * 256 or levels == MIN_LEVELS
    _, relative = _prob_errors(signal, decoded)
    assert float(relative.max()) <= prob_error_bound(levels)


def test_levels_fall_with_the_target():
    signal = teacher_topk(_logits(rows=128, vocab=50_257, seed=4, spread=3.0), 64, 1.0)
    levels = [stored_levels(encode_signal(signal, 50_257, target=t)) for t in (160, 150, 130, 110, 90)]
    sizes = [sum(t.numel() * t.element_size() for t in encode_signal(signal, 50_257, target=t).values())
             for t in (160, 150, 130, 110, 90)]
    assert levels == sorted(levels, reverse=True) and levels[0] > levels[-1]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_encoding_is_deterministic_and_ignores_the_entry_order():
    signal = teacher_topk(_logits(rows=64, vocab=5000, seed=5), 32, 1.0)
    permutation = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = type(signal)(signal.logprobs[..., permutation], signal.indices[..., permutation], signal.tail_logprob)
    first, second, third = encode_signal(signal, 5000), encode_signal(signal, 5000), encode_signal(shuffled, 5000)
    for other in (second, third):
        assert first.keys() == other.keys() and all(torch.equal(first[name], other[name]) for name in first)
    a, b = decode_signal(first), decode_signal(first)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.indices, b.indices)
    assert bool((a.indices[..., 1:] > a.indices[..., :-1]).all())  # decoded: ascending ids


def test_gaps_beyond_the_cap_decode_to_probability_zero():
    logits = torch.full((3, 100), -float("inf"))
    logits[:, :5] = torch.tensor([0.0, -1.0, -2.0, -3.0, -4.0])
    logits[0, 5] = -(GAP_CAP + 10)
    signal = teacher_topk(logits, 8, 1.0)
    encoded, decoded = _round_trip(signal, 100)
    ids, q = _by_id(decoded)
    deep = ~torch.isin(ids, torch.arange(5))
    assert float(q[deep].max()) == 0.0 and float(q[~deep].min()) > 0
    assert float(decoded.logprobs.min()) == LOG_PROB_FLOOR
    _, relative = _prob_errors(signal, decoded)
    assert float(relative[~deep].max()) <= prob_error_bound(stored_levels(encoded))


@pytest.mark.parametrize("vocab", [43, 256, 257, 50_257, 65_536, 151_936])
def test_ids_round_trip_at_every_vocabulary(vocab):
    signal = teacher_topk(_logits(rows=16, vocab=vocab, seed=vocab), min(64, vocab), 1.0)
    signal.indices[0, 0] = vocab - 1 if int(signal.indices[0].eq(vocab - 1).sum()) == 0 else signal.indices[0, 0]
    _, decoded = _round_trip(signal, vocab)
    assert torch.equal(_by_id(decoded)[0], _by_id(signal)[0])
    assert int(decoded.indices.max()) == vocab - 1  # the largest id survives the coding


def test_edge_shapes_round_trip():
    one = teacher_topk(_logits(rows=5, vocab=30), 1, 1.0)  # k = 1: only the exact top-1
    _, decoded = _round_trip(one, 30)
    assert torch.equal(decoded.logprobs, one.logprobs) and torch.equal(decoded.indices.long(), one.indices)
    every = teacher_topk(_logits(rows=4, vocab=16), 16, 1.0)  # k = V: every id
    _, decoded = _round_trip(every, 16)
    assert torch.equal(decoded.indices, torch.arange(16, dtype=torch.int32).expand(4, 16))
    batch = teacher_topk(_logits(rows=24, vocab=300).reshape(2, 3, 4, 300), 10, 1.0)  # any leading shape
    _, decoded = _round_trip(batch, 300)
    assert decoded.shape == (2, 3, 4) and decoded.tail_logprob.shape == (2, 3, 4)
    empty = teacher_topk(torch.zeros(0, 7, 50), 5, 1.0)
    _, decoded = _round_trip(empty, 50)
    assert decoded.logprobs.shape == (0, 7, 5)
    no_tail = type(one)(one.logprobs, one.indices)
    assert decode_signal(encode_signal(no_tail, 30)).tail_logprob is None


def test_bad_signals_and_damaged_tensors_are_refused():
    signal = teacher_topk(_logits(rows=8, vocab=100), 8, 1.0)
    with pytest.raises(ValueError, match="ids must lie"):
        encode_signal(signal, 50)  # ids beyond the vocabulary
    twice = type(signal)(signal.logprobs, signal.indices.clone(), signal.tail_logprob)
    twice.indices[0, 1] = twice.indices[0, 0]
    with pytest.raises(ValueError, match="twice"):
        encode_signal(twice, 100)
    encoded = encode_signal(signal, 100)
    for name, damage in [("layout", lambda t: t.clone().fill_(9)), ("ids_high", lambda t: t[:1]),
                         ("values_low", lambda t: t[:-1]), ("top", lambda t: t[:3])]:
        broken = dict(encoded, **{name: damage(encoded[name])})
        with pytest.raises(ValueError):
            decode_signal(broken)


def test_bytes_per_token_at_k64(tmp_path):
    """k = 64: ≤ 150 bytes per token for any V ≤ 65536 (the bound), measured on a random GPT-2-like
    teacher (ids spread uniformly: the ids' worst typical case) and a Zipfian one; the float32/int32
    signal in memory is 8k + 4 = 516."""
    assert target_bytes_per_token(64) == 150
    assert bytes_per_token_bound(64, 65_536) <= 150 < bytes_per_token_bound(64, 151_936) < 160
    cache = TeacherCache(tmp_path, 1 << 30)
    for name, logits in [("random", _logits(rows=512, vocab=65_536, spread=3.0)),
                         ("zipf", _zipf_logits(rows=512, vocab=50_257))]:
        signal = teacher_topk(logits, 64, 1.0).reshape(8, 64)
        encoded = encode_signal(signal, logits.shape[-1])
        size = cache.put(name, encoded, {"vocab": logits.shape[-1]})
        payload = sum(t.numel() * t.element_size() for t in encoded.values())
        assert payload <= 150 * 512 and size - payload < 1024  # + the safetensors header
        assert cache.get(name).stored_bytes == size
        absolute, _ = _prob_errors(signal, decode_signal(encoded))
        assert float(absolute.mean()) < 1e-4


# ---- keys, LRU -----------------------------------------------------------------------------------------------


def _tokens(seed=0, rows=4, length=16):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (rows, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "loss_mask": torch.ones_like(ids, dtype=torch.bool)}


def test_key_depends_on_every_input(tmp_path, tokenizer, teacher_dir):
    cache = TeacherCache(tmp_path / "cache", 1 << 20)
    teachers = [(teacher_dir, 1.0)]
    base, inputs = cache.key(teachers, _tokens(), 8, 2.0, 43)
    assert cache.key(teachers, _tokens(), 8, 2.0, 43)[0] == base  # deterministic
    assert json.loads(inputs["teachers"])[0][0] and inputs["k"] == "8"
    assert cache.key(teachers, _tokens(), None, 2.0, 43)[1]["k"] == "full"
    other_weights = save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, seed=5), tokenizer,
                                   tmp_path / "other")
    mask = _tokens()
    mask["loss_mask"][0, 0] = False
    changed = {
        "k": cache.key(teachers, _tokens(), 9, 2.0, 43)[0],
        "k=64": cache.key(teachers, _tokens(), 64, 2.0, 43)[0],
        "full vocabulary": cache.key(teachers, _tokens(), None, 2.0, 43)[0],
        "full, other temperature": cache.key(teachers, _tokens(), None, 1.0, 43)[0],
        "full, other data": cache.key(teachers, _tokens(seed=1), None, 2.0, 43)[0],
        "full, other dtype": cache.key(teachers, _tokens(), None, 2.0, 43, "torch.bfloat16")[0],
        "temperature": cache.key(teachers, _tokens(), 8, 1.0, 43)[0],
        "vocab": cache.key(teachers, _tokens(), 8, 2.0, 42)[0],
        "data": cache.key(teachers, _tokens(seed=1), 8, 2.0, 43)[0],
        "max_length": cache.key(teachers, {k: v[:, :12] for k, v in _tokens().items()}, 8, 2.0, 43)[0],
        "loss_mask": cache.key(teachers, mask, 8, 2.0, 43)[0],
        "weights": cache.key([(other_weights, 1.0)], _tokens(), 8, 2.0, 43)[0],
        "mixture": cache.key([(teacher_dir, 0.5), (other_weights, 0.5)], _tokens(), 8, 2.0, 43)[0],
        "dtype": cache.key(teachers, _tokens(), 8, 2.0, 43, "torch.bfloat16")[0],
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed)


def test_weights_hash_follows_the_file_content(tmp_path, tokenizer):
    folder = save_model_dir(tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2), tokenizer, tmp_path / "m")
    cache = TeacherCache(tmp_path / "cache", 1 << 20)
    before = cache.key([(folder, 1.0)], _tokens(), 8, 1.0, 43)[0]
    assert (cache.root / "weight-hashes.json").exists()  # the sidecar memo
    save_model_dir(tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=9), tokenizer, folder)  # overwritten
    assert cache.key([(folder, 1.0)], _tokens(), 8, 1.0, 43)[0] != before


def _entry(seed):
    return encode_signal(teacher_topk(_logits(rows=64, vocab=50, seed=seed), 8, 1.0), 50)


def test_lru_eviction_under_a_byte_budget(tmp_path):
    probe = TeacherCache(tmp_path / "probe", 1 << 30)
    sizes = [probe.put(str(seed), _entry(seed), {}) for seed in range(6)]  # entropy-coded: sizes vary a little
    cache = TeacherCache(tmp_path, 2 * max(sizes) + min(sizes) // 2)  # room for any two entries, not three
    assert cache.put("a", _entry(1), {}) == sizes[1] and cache.put("b", _entry(2), {}) == sizes[2]
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", _entry(3), {})
    assert cache.get("b") is None  # b, the least recently used, went
    assert cache.get("a") is not None and cache.get("c") is not None
    cache.put("d", _entry(4), {})
    assert cache.get("a") is None and cache.get("c") is not None and cache.get("d") is not None
    assert sum(row[2] for row in cache.entries()) <= cache.max_bytes
    assert set(load_file(str(cache.path("d")))) == {"top", "scale", "tail", "ids_low", "ids_high", "values_low",
                                                    "values_high", "layout", "shape"}
    # bigger than the whole budget: not stored, nothing evicted
    small = TeacherCache(tmp_path, sizes[5] - 1)
    assert small.put("e", _entry(5), {}) is None and small.get("e") is None
    assert {row[1] for row in cache.entries()} == {"c.safetensors", "d.safetensors"}
    assert not list(cache.root.glob(".tmp-*.part"))  # no temporary files left behind


def test_a_damaged_entry_is_a_miss(tmp_path):
    cache = TeacherCache(tmp_path, 1 << 20)
    cache.put("a", _entry(0), {})
    cache.path("a").write_bytes(b"not safetensors")
    assert cache.get("a") is None and not cache.path("a").exists()


# ---- jobs ----------------------------------------------------------------------------------------------------


def _run(spec, out, cache, monkeypatch):
    calls, events = [], []
    real = causal_lm.precompute_topk

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(causal_lm, "precompute_topk", counting)
    result = run_distillation(spec, out, on_event=lambda kind, data: events.append((kind, data)), device="cpu",
                              teacher_cache=cache)
    signal = [data for kind, data in events if kind == "teacher_signal"]
    assert len(signal) == 1
    return result, signal[0], len(calls)


def _weights(result):
    return load_file(str(result.model_path / "model.safetensors"))


def test_a_repeat_job_hits_and_trains_bit_identically(tmp_path, teacher_dir, monkeypatch):
    cache = TeacherCache(tmp_path / "work", 1 << 30)
    spec = _spec(tmp_path, teacher_dir)
    first, event1, calls1 = _run(spec, tmp_path / "job1", cache, monkeypatch)
    second, event2, calls2 = _run(spec, tmp_path / "job2", cache, monkeypatch)
    assert (event1["cache"], calls1, event1["stored"]) == ("miss", 1, True)
    assert (event2["cache"], calls2) == ("hit", 0)  # the teacher did not run
    assert event1["cache_key"] == event2["cache_key"] and cache.path(event2["cache_key"]).exists()
    for event in (event1, event2):
        assert event["top_k"] == 8 and event["bytes_per_token"] == 8 * 8 + 4
        assert event["cache_bytes_per_token"] <= target_bytes_per_token(8) + 1024 / event["positions"]  # + header
    assert event1["cache_bytes"] == event2["cache_bytes"] == cache.path(event1["cache_key"]).stat().st_size
    from safetensors import safe_open

    with safe_open(str(cache.path(event1["cache_key"])), "pt") as stored:  # the key's inputs, in its metadata
        metadata = stored.metadata()
    assert (metadata["k"], metadata["temperature"], metadata["vocab"], metadata["format"]) == ("8", "2.0", "43", "2")
    assert len(metadata["data"]) == 64 and json.loads(metadata["teachers"])[0][1] == 1.0
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert first.history == second.history

    # another k: a miss (a different entry), the teacher runs again
    third, event3, calls3 = _run(_spec(tmp_path, teacher_dir, top_k=6), tmp_path / "job3", cache, monkeypatch)
    assert (event3["cache"], calls3) == ("miss", 1) and event3["cache_key"] != event1["cache_key"]


@pytest.mark.parametrize("budget", [None, 0])
def test_cache_off_behaves_as_before(tmp_path, teacher_dir, monkeypatch, budget):
    spec = _spec(tmp_path, teacher_dir)
    cache = None if budget is None else TeacherCache(tmp_path / "work", budget)
    plain, event, calls = _run(spec, tmp_path / "plain", None, monkeypatch)
    off, event_off, calls_off = _run(spec, tmp_path / "off", cache, monkeypatch)
    assert event["cache"] == event_off["cache"] == "off" and calls == calls_off == 1
    assert "cache_key" not in event_off and not (tmp_path / "work" / "teacher-signals").exists()
    a, b = _weights(plain), _weights(off)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_job_resumed_with_the_cache_equals_its_uninterrupted_first_run(tmp_path, teacher_dir):
    from distill.checkpoint import latest_checkpoint
    from distill.errors import JobStopped

    cache = TeacherCache(tmp_path / "work", 1 << 30)
    spec = _spec(tmp_path, teacher_dir)
    spec.hyperparameters.epochs = 2
    spec.hyperparameters.batch_size = 4
    straight = run_distillation(spec, tmp_path / "straight", device="cpu", teacher_cache=cache,
                                checkpoint_interval_s=3600)  # the miss: trains from the decoded signal
    records, out = [], tmp_path / "interrupted"
    with pytest.raises(JobStopped):
        run_distillation(spec, out, device="cpu", checkpoint_interval_s=3600, teacher_cache=cache,
                         on_event=lambda kind, data: records.append(data) if kind == "epoch" else None,
                         should_stop=lambda: len(records) >= 1)
    assert latest_checkpoint(out) is not None
    hits = []
    resumed = run_distillation(spec, out, device="cpu", checkpoint_interval_s=3600, resume=True, teacher_cache=cache,
                               on_event=lambda kind, data: hits.append(data["cache"])
                               if kind == "teacher_signal" else None)
    assert hits == ["hit"] and resumed.history == straight.history
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
