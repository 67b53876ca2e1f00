"""The teacher-signal store shared across jobs (distill/teacher_cache.py): content keys, the
compressed format, LRU eviction under a byte budget, and causal-LM jobs that hit it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distill.losses import teacher_topk
from distill.recipes import causal_lm
from distill.spec import JobSpec
from distill.teacher_cache import (GAP_CAP, TeacherCache, decode_signal, encode_signal, encoded_bytes_per_token,
                                   id_width)
from distill.train import run_distillation
from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language,
                                        tiny_gpt2)

# Reconstruction bound on each top-k probability, relative to the top-1 probability of its position:
# sqrt companding with 254 levels over d_max ≤ GAP_CAP nats gives ≤ 0.011 (module docstring).
PROB_ERROR_BOUND = 0.011


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


def _prob_errors(signal, decoded):
    p, q = signal.logprobs.exp(), decoded.logprobs.exp()
    relative = (p - q).abs() / p[..., :1]
    return (p - q).abs(), relative


# ---- the stored format ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spread", [1.0, 4.0, 12.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reconstruction_error_is_within_the_stated_bound(spread, temperature):
    signal = teacher_topk(_logits(spread=spread), 64, temperature)
    decoded = decode_signal(encode_signal(signal, 1000))
    absolute, relative = _prob_errors(signal, decoded)
    assert float(relative.max()) <= PROB_ERROR_BOUND
    assert float(absolute.mean()) < 1e-3
    assert torch.equal(decoded.indices.long(), signal.indices.long())  # ids are exact
    assert torch.equal(decoded.logprobs[..., 0], signal.logprobs[..., 0])  # the top-1 is exact
    assert torch.equal(decoded.tail_logprob, signal.tail_logprob)  # the tail is exact
    assert decoded.logprobs.dtype == torch.float32 and decoded.indices.dtype == torch.int32


def test_gaps_beyond_the_cap_decode_to_probability_zero():
    logits = torch.full((3, 100), -float("inf"))
    logits[:, :5] = torch.tensor([0.0, -1.0, -2.0, -3.0, -4.0])
    logits[0, 5] = -(GAP_CAP + 10)
    signal = teacher_topk(logits, 8, 1.0)
    decoded = decode_signal(encode_signal(signal, 100))
    assert float(decoded.logprobs.exp()[:, 5:].max()) == 0.0
    assert float(_prob_errors(signal, decoded)[1][:, :5].max()) <= PROB_ERROR_BOUND


@pytest.mark.parametrize("vocab", [43, 256, 257, 50_257, 65_536, 151_936])
def test_ids_use_the_smallest_width_and_round_trip(vocab):
    width = id_width(vocab)
    assert width == (1 if vocab <= 256 else 2 if vocab <= 65_536 else 3)
    signal = teacher_topk(_logits(rows=16, vocab=vocab, seed=vocab), min(64, vocab), 1.0)
    signal.indices[0, 0] = vocab - 1  # the largest id survives the packing
    encoded = encode_signal(signal, vocab)
    assert encoded["ids"].shape[-1] == width
    assert torch.equal(decode_signal(encoded).indices.long(), signal.indices.long())


def test_bytes_per_token_at_k64(tmp_path):
    """k = 64: 2k + 12 = 140 bytes for a vocabulary of ≤ 256 ids (under the 150 goal), 3k + 12 = 204 for
    ≤ 65536 (16-bit ids alone are 128 bytes, so the goal is out of reach there), 268 for ≤ 2^24; the
    float32/int32 signal in memory is 8k + 4 = 516."""
    assert encoded_bytes_per_token(64, 256) == 140 <= 150
    assert encoded_bytes_per_token(64, 65_536) == 204 < 516
    assert encoded_bytes_per_token(64, 151_936) == 268 < 516
    cache = TeacherCache(tmp_path, 1 << 30)
    for vocab in (200, 32_000):
        signal = teacher_topk(_logits(rows=512, vocab=vocab), 64, 1.0).reshape(8, 64)
        size = cache.put(f"v{vocab}", encode_signal(signal, vocab), {"vocab": vocab})
        per_token = size / 512
        assert encoded_bytes_per_token(64, vocab) <= per_token < encoded_bytes_per_token(64, vocab) + 2  # + header
    assert size / 512 < 516 / 2.5


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
    other_weights = save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, seed=5), tokenizer,
                                   tmp_path / "other")
    mask = _tokens()
    mask["loss_mask"][0, 0] = False
    changed = {
        "k": cache.key(teachers, _tokens(), 9, 2.0, 43)[0],
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
    size = probe.put("x", _entry(0), {})
    cache = TeacherCache(tmp_path, 2 * size + size // 2)  # room for two entries
    assert cache.put("a", _entry(1), {}) == size and cache.put("b", _entry(2), {}) == size
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", _entry(3), {})
    assert cache.get("b") is None  # b, the least recently used, went
    assert cache.get("a") is not None and cache.get("c") is not None
    cache.put("d", _entry(4), {})
    assert cache.get("a") is None and cache.get("c") is not None and cache.get("d") is not None
    assert sum(row[2] for row in cache.entries()) <= cache.max_bytes
    assert set(load_file(str(cache.path("d")))) == {"top", "scale", "codes", "ids", "tail"}
    # bigger than the whole budget: not stored, nothing evicted
    small = TeacherCache(tmp_path, size - 1)
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
        assert 2 * 8 + 12 <= event["cache_bytes_per_token"] < 2 * 8 + 12 + 2  # k(1 + 1-byte ids) + 12, + header
    assert event1["cache_bytes"] == event2["cache_bytes"] == cache.path(event1["cache_key"]).stat().st_size
    from safetensors import safe_open

    with safe_open(str(cache.path(event1["cache_key"])), "pt") as stored:  # the key's inputs, in its metadata
        metadata = stored.metadata()
    assert (metadata["k"], metadata["temperature"], metadata["vocab"], metadata["format"]) == ("8", "2.0", "43", "1")
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
