"""Hugging Face model directories: safety checks, inspection, loading, derived students, vocabularies, cards."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import save_file  # noqa: E402

from distill import hf  # noqa: E402
from distill.errors import ModelFormatError, SpecError, VocabularyMismatch  # noqa: E402
from tests.distill.hf_factories import (  # noqa: E402
    SYNTHETIC_WORDS,
    make_word_tokenizer,
    save_model_dir,
    synthetic_language,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
)


@pytest.fixture(scope="module")
def tok():
    return make_word_tokenizer(SYNTHETIC_WORDS, with_chat_template=True)


@pytest.fixture(scope="module")
def gpt2(tok):
    return tiny_gpt2(tok)


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(tok)


@pytest.fixture(scope="module")
def gpt2_dir(gpt2, tok, tmp_path_factory):
    return save_model_dir(gpt2, tok, tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def llama_dir(llama, tok, tmp_path_factory):
    return save_model_dir(llama, tok, tmp_path_factory.mktemp("llama") / "model")


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "copy")


def _batch(tok, n: int = 3):
    encoded = tok(synthetic_language(n, seed=5), padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# --------------------------------------------------------------------------- inspection and safety

def test_inspect_describes_gpt2_and_counts_stored_parameters(gpt2_dir, gpt2, tok):
    info = hf.inspect_model_dir(gpt2_dir)
    assert info == {
        "format": "hf", "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": len(tok),
        "tokenizer_vocab_size": len(tok), "has_tokenizer": True, "has_chat_template": True, "num_layers": 4,
        "hidden_size": 64, "num_attention_heads": 4, "parameters": sum(p.numel() for p in gpt2.parameters()),
        "task": "causal_lm",
        "num_labels": None, "context_length": gpt2.config.n_positions,
    }
    # the tied lm_head is stored (and counted) once
    assert info["parameters"] < sum(p.numel() for p in gpt2.parameters()) + gpt2.lm_head.weight.numel()


def test_inspect_llama_and_classifier_without_tokenizer(llama_dir, llama, tok, tmp_path):
    info = hf.inspect_model_dir(llama_dir)
    assert info["parameters"] == sum(p.numel() for p in llama.parameters())  # untied head counted
    assert (info["model_type"], info["num_layers"], info["task"]) == ("llama", 4, "causal_lm")
    bert = tiny_bert_classifier(tok, num_labels=3)
    bert.save_pretrained(tmp_path / "bert")  # weights only, no tokenizer
    info = hf.inspect_model_dir(tmp_path / "bert")
    assert (info["task"], info["num_labels"], info["has_tokenizer"], info["tokenizer_vocab_size"],
            info["has_chat_template"]) == ("text_classification", 3, False, None, False)
    assert info["parameters"] == sum(p.numel() for p in bert.parameters())
    with pytest.raises(ModelFormatError, match="no tokenizer"):
        hf.load_tokenizer(tmp_path / "bert")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "training_args.bin", "sub/optimizer.pt", "weights.pkl"])
def test_pickled_files_refused(gpt2_dir, tmp_path, name):
    model_dir = _copy(gpt2_dir, tmp_path)
    (model_dir / name).parent.mkdir(exist_ok=True)
    (model_dir / name).write_bytes(b"\x80\x04\x95 not really a pickle, and never opened")
    for call in (hf.inspect_model_dir, hf.load_causal_lm, hf.load_tokenizer):
        with pytest.raises(ModelFormatError) as caught:
            call(model_dir)
        assert f"'{name}'" in caught.value.message and "safetensors" in caught.value.message


def test_auto_map_refused(gpt2_dir, tmp_path):
    model_dir = _copy(gpt2_dir, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="auto_map"):
        hf.load_causal_lm(model_dir)


def test_missing_or_broken_config(gpt2_dir, tmp_path):
    model_dir = _copy(gpt2_dir, tmp_path)
    (model_dir / "config.json").write_text("{broken")
    with pytest.raises(ModelFormatError, match="config.json is not valid JSON"):
        hf.inspect_model_dir(model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="no config.json"):
        hf.inspect_model_dir(model_dir)
    with pytest.raises(ModelFormatError, match="not a model directory"):
        hf.inspect_model_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("hostile, fragment", [
    ('{"model_type": "gpt2", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64 levels"),
    ('{"model_type": "gpt2", "n_embd": ' + "1" * 5000 + "}", "more than 4300 digits"),
])
def test_hostile_config_json_names_the_file(gpt2_dir, tmp_path, name, hostile, fragment):
    """Once a RecursionError / bare ValueError out of the upload's inspection (a 500)."""
    model_dir = _copy(gpt2_dir, tmp_path)
    (model_dir / name).write_text(hostile)
    with pytest.raises(ModelFormatError) as caught:
        hf.inspect_model_dir(model_dir)
    assert caught.value.message.startswith(f"{name}: ") and fragment in caught.value.message


def test_oversized_config_json_is_refused_unread(gpt2_dir, tmp_path, monkeypatch):
    model_dir = _copy(gpt2_dir, tmp_path)
    monkeypatch.setattr(hf, "MAX_JSON_BYTES", 64)
    with pytest.raises(ModelFormatError, match="config.json is larger than 64 bytes"):
        hf.inspect_model_dir(model_dir)


def test_weights_must_be_safetensors(gpt2_dir, tmp_path):
    model_dir = _copy(gpt2_dir, tmp_path)
    (model_dir / "model.safetensors").rename(model_dir / "other.safetensors")
    with pytest.raises(ModelFormatError, match="found only other.safetensors"):
        hf.inspect_model_dir(model_dir)
    (model_dir / "other.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no safetensors weights"):
        hf.inspect_model_dir(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"garbage header")
    with pytest.raises(ModelFormatError, match="'model.safetensors' is not a readable safetensors file"):
        hf.inspect_model_dir(model_dir)


def test_sharded_weights(llama, tok, tmp_path):
    model_dir = tmp_path / "sharded"
    llama.save_pretrained(model_dir, max_shard_size="100KB")
    tok.save_pretrained(model_dir)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert hf.inspect_model_dir(model_dir)["parameters"] == sum(p.numel() for p in llama.parameters())
    ids, mask = _batch(tok)
    assert torch.allclose(_logits(hf.load_causal_lm(model_dir), ids, mask), _logits(llama, ids, mask), atol=1e-5)
    (model_dir / shards[-1]).unlink()
    with pytest.raises(ModelFormatError) as caught:
        hf.inspect_model_dir(model_dir)
    assert f"'{shards[-1]}'" in caught.value.message and "missing" in caught.value.message


def test_missing_tensor_refused_on_load(llama, tok, tmp_path):
    model_dir = save_model_dir(llama, tok, tmp_path / "m")
    state = {k: v.contiguous() for k, v in llama.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError) as caught:
        hf.load_causal_lm(model_dir)
    assert caught.value.tensor == "model.norm.weight"


# --------------------------------------------------------------------------- loading

def test_load_causal_lm_and_tokenizer(gpt2_dir, gpt2, tok, tmp_path):
    model = hf.load_causal_lm(gpt2_dir)
    assert not model.training and model.dtype == torch.float32
    ids, mask = _batch(tok)
    assert torch.allclose(_logits(model, ids, mask), _logits(gpt2, ids, mask), atol=1e-5)
    assert hf.load_tokenizer(gpt2_dir).get_vocab() == tok.get_vocab()
    no_pad = make_word_tokenizer(SYNTHETIC_WORDS)
    no_pad.pad_token = None
    model_dir = save_model_dir(gpt2, no_pad, tmp_path / "nopad")
    assert hf.load_tokenizer(model_dir).pad_token == "<eos>"
    with pytest.raises(ModelFormatError, match="not a causal language model"):
        hf.load_causal_lm(save_model_dir(tiny_bert_classifier(tok, 2), tok, tmp_path / "bert"))


def test_load_classifier_new_head_from_lm(gpt2_dir, tok):
    model = hf.load_classifier(gpt2_dir, num_labels=3)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.num_labels == 3 and model.config.pad_token_id == tok.pad_token_id
    ids, mask = _batch(tok)
    assert _logits(model, ids, mask).shape == (3, 3)


# --------------------------------------------------------------------------- students

def test_evenly_spaced_layers():
    assert hf.evenly_spaced_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert hf.evenly_spaced_layers(12, 3) == [0, 6, 11]
    assert hf.evenly_spaced_layers(4, 2) == [0, 3]
    assert hf.evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert hf.evenly_spaced_layers(4, 1) == [0]


def test_transformer_layers_found(gpt2, llama, tok):
    assert hf.transformer_layers(gpt2) == (gpt2.transformer, "h")
    assert hf.transformer_layers(llama) == (llama.model, "layers")
    bert = tiny_bert_classifier(tok, 2)
    assert hf.transformer_layers(bert) == (bert.bert.encoder, "layer")


def _check_student(teacher, student, kept, blocks_of, tok, tmp_path):
    teacher_blocks, student_blocks = blocks_of(teacher), blocks_of(student)
    assert len(student_blocks) == len(kept) and student.config.num_hidden_layers == len(kept)
    for position, index in enumerate(kept):
        for (name, a), (_, b) in zip(teacher_blocks[index].state_dict().items(),
                                     student_blocks[position].state_dict().items()):
            assert torch.equal(a, b), name
    embeddings = teacher.get_input_embeddings().weight
    assert torch.equal(student.get_input_embeddings().weight, embeddings)
    assert student.get_input_embeddings().weight.data_ptr() != embeddings.data_ptr()  # a copy, not shared
    assert len(blocks_of(teacher)) == 4  # the teacher is untouched
    ids, mask = _batch(tok)
    logits = _logits(student, ids, mask)
    assert logits.shape == (*ids.shape, len(tok)) and torch.isfinite(logits).all()
    assert not torch.allclose(logits, _logits(teacher, ids, mask))
    model_dir = save_model_dir(student, tok, tmp_path / "student")
    assert hf.inspect_model_dir(model_dir)["num_layers"] == len(kept)
    reloaded = hf.load_causal_lm(model_dir)
    assert torch.allclose(_logits(reloaded, ids, mask), logits, atol=1e-5)
    return reloaded


def test_derive_gpt2(gpt2, tok, tmp_path):
    student = hf.derive_student(gpt2, num_layers=2)
    _check_student(gpt2, student, [0, 3], lambda m: m.transformer.h, tok, tmp_path / "a")
    assert student.config.n_layer == 2
    assert student.lm_head.weight is student.transformer.wte.weight  # tying survives the copy
    explicit = hf.derive_student(gpt2, layers=[1, 2])
    _check_student(gpt2, explicit, [1, 2], lambda m: m.transformer.h, tok, tmp_path / "b")
    assert [block.attn.layer_idx for block in explicit.transformer.h] == [0, 1]


def test_derive_llama_generates_with_cache(llama, tok, tmp_path):
    student = hf.derive_student(llama, layers=[1, 3])
    reloaded = _check_student(llama, student, [1, 3], lambda m: m.model.layers, tok, tmp_path)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    prompt = tok("the cat", return_tensors="pt")
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        cached = student.generate(**prompt, use_cache=True, **settings)
        uncached = student.generate(**prompt, use_cache=False, **settings)
        from_disk = reloaded.generate(**prompt, use_cache=True, **settings)
    assert cached.shape == (1, 2 + 6)
    assert cached.tolist() == uncached.tolist() == from_disk.tolist()


def test_derive_subsets_per_layer_config_lists(tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
                         use_sliding_window=True, sliding_window=4)
    torch.manual_seed(0)
    teacher = Qwen3ForCausalLM(config).eval()
    student = hf.derive_student(teacher, layers=[0, 1, 3])
    assert student.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 4


@pytest.mark.parametrize("kwargs, param", [
    ({"layers": [0, 0]}, "student.derive.layers"),
    ({"layers": [2, 1]}, "student.derive.layers"),
    ({"layers": [4]}, "student.derive.layers"),
    ({"layers": [-1]}, "student.derive.layers"),
    ({"layers": [True]}, "student.derive.layers"),
    ({"layers": []}, "student.derive.layers"),
    ({}, "student.derive.layers"),
    ({"layers": [0], "num_layers": 1}, "student.derive.layers"),
    ({"num_layers": 0}, "student.derive.num_layers"),
    ({"num_layers": 5}, "student.derive.num_layers"),
])
def test_derive_validates_choice(gpt2, kwargs, param):
    with pytest.raises(SpecError) as caught:
        hf.derive_student(gpt2, **kwargs)
    assert caught.value.param == param


def test_student_from_config(gpt2, llama, tok):
    student = hf.student_from_config(gpt2.config, {"num_hidden_layers": 2, "n_embd": 32}, "causal_lm")
    assert type(student).__name__ == "GPT2LMHeadModel"
    assert (student.config.n_layer, student.config.n_embd, len(student.transformer.h)) == (2, 32, 2)
    assert gpt2.config.n_layer == 4  # the teacher's config is untouched
    ids, mask = _batch(tok)
    assert _logits(student, ids, mask).shape == (*ids.shape, len(tok))
    narrow = hf.student_from_config(llama.config, {"hidden_size": 32, "num_hidden_layers": 1}, "causal_lm")
    assert narrow.config.head_dim == 8 and narrow.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    classifier = hf.student_from_config(gpt2.config, {"num_labels": 5}, "text_classification")
    assert classifier.score.weight.shape == (5, 64)
    with pytest.raises(SpecError) as caught:
        hf.student_from_config(gpt2.config, {"bogus": 1}, "causal_lm")
    assert caught.value.param == "student.architecture.config.bogus"
    with pytest.raises(SpecError) as caught:
        hf.student_from_config(gpt2.config, {"model_type": "llama"}, "causal_lm")
    assert caught.value.param == "student.architecture.config.model_type"
    with pytest.raises(SpecError):
        hf.student_from_config(gpt2.config, {"n_embd": 30}, "causal_lm")  # not divisible by 4 heads


# --------------------------------------------------------------------------- vocabularies

def test_shared_vocab_size(tok):
    same = make_word_tokenizer(SYNTHETIC_WORDS, with_chat_template=True)
    assert hf.shared_vocab_size(tok, same, len(tok), len(tok)) == len(tok)
    padded_teacher = tiny_gpt2(tok, n_layer=1, vocab_size=len(tok) + 17)
    shared = hf.shared_vocab_size(tok, same, padded_teacher.config.vocab_size, len(tok))
    assert shared == len(tok)
    ids, mask = _batch(tok, 2)
    assert _logits(padded_teacher, ids, mask)[..., :shared].shape == (*ids.shape, len(tok))
    with pytest.raises(ModelFormatError) as caught:
        hf.shared_vocab_size(tok, same, len(tok), len(tok) - 1)
    assert caught.value.param == "student"


def test_different_tokenizers_suggest_sequence_method(tok):
    other = make_word_tokenizer(list(reversed(SYNTHETIC_WORDS)))
    with pytest.raises(VocabularyMismatch) as caught:
        hf.shared_vocab_size(tok, other, len(tok), len(other))
    error = caught.value
    assert error.code == "vocabulary_mismatch" and error.param == "student"
    assert '"method": "sequence"' in error.message and "first difference at id 3" in error.message
    bigger = make_word_tokenizer([*SYNTHETIC_WORDS, "zebra"])
    with pytest.raises(VocabularyMismatch, match=f"{len(tok)} tokens and the student's {len(tok) + 1}"):
        hf.shared_vocab_size(tok, bigger, len(tok), len(bigger))


# --------------------------------------------------------------------------- output

def test_model_card_and_save_hf(gpt2, tok, tmp_path):
    card = hf.model_card({
        "teacher": "org/teacher-7b", "student": "tiny-student", "task": "causal_lm", "method": "logits",
        "loss": "forward_kl", "data": {"training_file": "train.jsonl", "rows": 1234},
        "hyperparameters": {"learning_rate": 0.00031, "epochs": 3, "temperature": 2.5},
        "evaluation": {"teacher": {"perplexity": 11.75}, "student": {"perplexity": 13.125, "tokens_per_s": 4567}},
    })
    front, body = card.split("---\n", 2)[1:]
    assert "library_name: transformers" in front and "- distillation" in front
    assert 'base_model: "org/teacher-7b"' in front and "pipeline_tag: text-generation" in front
    for expected in ("org/teacher-7b", "train.jsonl", "1234", "forward_kl", "| learning_rate | 0.00031 |",
                     "| epochs | 3 |", "| temperature | 2.5 |", "| perplexity | 11.75 | 13.125 |",
                     "| tokens_per_s | — | 4567 |", "## Evaluation", "## Hyperparameters"):
        assert expected in body, expected
    out = hf.save_hf(gpt2, tok, tmp_path / "out", card)
    assert (out / "README.md").read_text() == card
    assert (out / "model.safetensors").is_file()
    assert not [p for p in out.rglob("*") if p.suffix in hf.PICKLE_SUFFIXES]
    assert hf.inspect_model_dir(out)["parameters"] == sum(p.numel() for p in gpt2.parameters())
