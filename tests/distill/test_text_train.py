"""The transformers distillation loop at engine level: the chunked loss, vocabulary
alignment for a padded teacher, and stopping."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distill.errors import JobStopped
from distill.spec import JobSpec
from distill.losses import chunked_lm_loss
from distill.recipes._text import LogitsHead
from distill.train import run_distillation
from tests.distill.hf_factories import SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language, tiny_gpt2


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer(SYNTHETIC_WORDS)


def test_chunked_loss_equals_full_logits_loss(tokenizer):
    torch.manual_seed(0)
    student, teacher = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2), tiny_gpt2(tokenizer, n_layer=2, seed=1)
    hidden = torch.randn(37, 32, requires_grad=True)  # 37 positions: chunks of 8 don't divide it
    teacher_hidden = torch.randn(37, 64)
    targets = torch.randint(0, len(tokenizer), (37,))
    head_s, head_t = student.get_output_embeddings(), teacher.get_output_embeddings()
    kd, ce = chunked_lm_loss(head_s, hidden, targets, (head_t, teacher_hidden), len(tokenizer), "forward_kl", 2.0,
                             0.5, chunk=8)
    (kd + ce).backward()
    chunked_grad = hidden.grad.clone()
    hidden.grad = None

    s_logits, t_logits = head_s(hidden) / 2.0, head_t(teacher_hidden).detach() / 2.0
    expected_kd = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                           reduction="sum")
    expected_ce = F.cross_entropy(head_s(hidden), targets, reduction="sum")
    (expected_kd + expected_ce).backward()
    torch.testing.assert_close(kd, expected_kd.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ce, expected_ce.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked_grad, hidden.grad, rtol=1e-4, atol=1e-5)


def test_logits_head_splits_gpt2_into_body_and_head(tokenizer):
    model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2)
    ids = torch.tensor([[3, 4, 5, 6]])
    head = LogitsHead(model, ids, torch.ones_like(ids))
    assert head.split
    with torch.no_grad():
        torch.testing.assert_close(head.head(head.body(ids, torch.ones_like(ids))), model(input_ids=ids).logits)


def _job(tmp_path, teacher_dir, **extra) -> JobSpec:
    texts = [" ".join(synthetic_language(4, seed=i)) for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = {"task": "causal_lm", "teacher": {"path": str(teacher_dir)}, "student": {"derive": {"num_layers": 1}},
            "training_file": str(tmp_path / "train.jsonl"), "validation_split": 0.2, "data": {"max_length": 32},
            "hyperparameters": {"epochs": 1, "batch_size": 8}, **extra}
    return JobSpec.from_dict(spec)


def test_teacher_with_padded_vocabulary_is_aligned(tmp_path, tokenizer):
    # Like Qwen (152064 rows for a 151936-token tokenizer): the extra rows are never real tokens.
    padded = tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer) + 17)
    teacher_dir = save_model_dir(padded, tokenizer, tmp_path / "teacher")
    for extra in ({}, {"teacher_signal": {"top_k": 5}}):
        result = run_distillation(_job(tmp_path, teacher_dir, **extra), tmp_path / "out", device="cpu")
        assert result.evaluation["teacher"]["perplexity"] > 1
        assert 0 <= result.evaluation["top1_agreement"] <= 1
        assert (result.model_path / "config.json").exists() and (result.model_path / "README.md").exists()


def test_should_stop_stops_the_loop(tmp_path, tokenizer):
    teacher_dir = save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), tokenizer, tmp_path / "t")
    events = []
    with pytest.raises(JobStopped):
        run_distillation(_job(tmp_path, teacher_dir), tmp_path / "out", on_event=lambda k, d: events.append(k),
                              should_stop=lambda: True, device="cpu")
    assert "stage" in events and "epoch" not in events


def test_loss_chunks_are_sized_by_vocabulary():
    from distill.losses.chunked import LOSS_CHUNK_FLOATS, loss_chunk_rows

    assert loss_chunk_rows(32_000) == 512 and loss_chunk_rows(128_000) < loss_chunk_rows(32_000)
    for vocab in (50, 8_192, 32_000, 151_936, 262_144):
        assert 16 <= loss_chunk_rows(vocab) <= 512
        assert loss_chunk_rows(vocab) * vocab <= max(LOSS_CHUNK_FLOATS, 16 * vocab)


def test_sequence_kd_works_across_tokenizers(tmp_path, tokenizer):
    # The student has its own, different tokenizer: only text passes between the models.
    from tests.distill.hf_factories import SYNTHETIC_WORDS as words

    teacher_dir = save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), tokenizer, tmp_path / "t")
    other = make_word_tokenizer(list(reversed(words)) + ["extra"])
    student_dir = save_model_dir(tiny_gpt2(other, n_layer=1, n_embd=32, n_head=2, seed=3), other, tmp_path / "s")
    prompts = [{"prompt": " ".join(s.split()[:3]), "completion": "x"} for s in synthetic_language(12, seed=4)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    spec = _job(tmp_path, teacher_dir, method="sequence", student={"path": str(student_dir)},
                generation={"max_new_tokens": 6, "temperature": 0.8})
    spec.training_file = tmp_path / "prompts.jsonl"
    result = run_distillation(spec, tmp_path / "out", device="cpu")
    generated = [json.loads(line) for line in result.generated_path.read_text().splitlines()]
    assert generated and {g["prompt"] for g in generated} <= {p["prompt"] for p in prompts}
    assert result.evaluation["top1_agreement"] is None  # no shared vocabulary to compare on
    assert result.architecture["vocab_size"] == len(other)
