"""Universal Logit Distillation (loss.type "uld"): the loss against a direct formula, its
invariances, the alignment of two tokenizations, and training a student whose tokenizer
differs from the teacher's (it learns, resumes bit-identically and ships its own tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from distill.losses.chunked import shifted
from distill.losses.uld import align_completions, chunked_uld_loss, uld_distance
from distill.recipes import get_recipe
from distill.recipes.causal_lm_uld import CausalLMULD
from distill.spec import JobSpec
from distill.text_data import tokenize_for_lm
from distill.train import run_distillation
from tests.distill.resume_helpers import assert_same_tensors, interrupt_inside_epoch_two
from tests.distill.hf_factories import (SPECIAL_TOKENS, SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir,
                                        synthetic_language, tiny_gpt2, tiny_llama)
from tests.factories import train_language_model


# ---- the loss against a direct formula ------------------------------------------------------------------------

def direct_uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> list[float]:
    """Σ_i |q_(i) − p_(i)| row by row with Python sorting and zero padding."""
    values = []
    for s_row, t_row in zip(student_logits.tolist(), teacher_logits.tolist()):
        q = sorted(torch.softmax(torch.tensor(s_row, dtype=torch.float64) / temperature, 0).tolist(), reverse=True)
        p = sorted(torch.softmax(torch.tensor(t_row, dtype=torch.float64) / temperature, 0).tolist(), reverse=True)
        width = max(len(p), len(q))
        q, p = q + [0.0] * (width - len(q)), p + [0.0] * (width - len(p))
        values.append(sum(abs(a - b) for a, b in zip(q, p)))
    return values


def direct_gradient(own_logits: torch.Tensor, other_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """d Σ_rows ULD / d own_logits by hand: entry j of rank r(j) gets g_j = sign(x_j − y_(r(j)))
    (y padded with zeros), then back through softmax at T: dz_k = x_k (g_k − Σ_j x_j g_j) / T."""
    gradient = torch.zeros_like(own_logits, dtype=torch.float64)
    for row, (own, other) in enumerate(zip(own_logits.double(), other_logits.double())):
        x, y = torch.softmax(own / temperature, 0), torch.softmax(other / temperature, 0)
        y_sorted = sorted(y.tolist(), reverse=True) + [0.0] * len(x)
        ranks = sorted(range(len(x)), key=lambda j: -x[j].item())
        g = torch.zeros_like(x)
        for rank, j in enumerate(ranks):
            g[j] = 1.0 if x[j].item() > y_sorted[rank] else -1.0
        gradient[row] = x * (g - (x * g).sum()) / temperature
    return gradient


@pytest.mark.parametrize("student_vocab, teacher_vocab", [(5, 5), (5, 8), (9, 4)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_uld_equals_the_direct_formula_in_value_and_gradient(student_vocab, teacher_vocab, temperature):
    generator = torch.Generator().manual_seed(student_vocab * 10 + teacher_vocab)
    student = (2 * torch.randn(3, student_vocab, generator=generator, dtype=torch.float64)).requires_grad_()
    teacher = (2 * torch.randn(3, teacher_vocab, generator=generator, dtype=torch.float64)).requires_grad_()
    value = uld_distance(student, teacher, temperature)
    assert value.shape == (3,)
    torch.testing.assert_close(value, torch.tensor(direct_uld(student, teacher, temperature), dtype=torch.float64))
    value.sum().backward()
    torch.testing.assert_close(student.grad, direct_gradient(student.detach(), teacher.detach(), temperature))
    torch.testing.assert_close(teacher.grad, direct_gradient(teacher.detach(), student.detach(), temperature))


def test_uld_is_invariant_to_permuting_either_vocabulary():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 7, generator=generator), torch.randn(4, 11, generator=generator)
    base = uld_distance(student, teacher)
    assert (base > 0.01).all()
    for _ in range(3):
        s_perm, t_perm = torch.randperm(7, generator=generator), torch.randperm(11, generator=generator)
        torch.testing.assert_close(uld_distance(student[:, s_perm], teacher), base)
        torch.testing.assert_close(uld_distance(student, teacher[:, t_perm]), base)
        torch.testing.assert_close(uld_distance(student[:, s_perm], teacher[:, t_perm]), base)


def test_uld_is_zero_when_the_sorted_distributions_are_equal():
    student = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 1.0, -2.0]])
    # The teacher: the same probabilities over other ids, plus tokens of probability 0 (a longer vocabulary).
    teacher = torch.cat([student[:, [3, 0, 2, 1]], torch.full((2, 3), float("-inf"))], dim=1)
    # Zero up to rounding (the softmax sums the same terms in another order).
    torch.testing.assert_close(uld_distance(student, teacher), torch.zeros(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(uld_distance(teacher, student), torch.zeros(2), rtol=0, atol=1e-6)
    # A shifted logit changes the shape of the distribution: no longer zero.
    assert (uld_distance(student + torch.tensor([1.0, 0, 0, 0]), teacher) > 0.01).all()


def test_chunked_loss_equals_per_position_formula_and_its_gradient():
    """Σ ULD over the pairs + Σ CE over every student target, from hidden states and heads, any chunk size."""
    generator = torch.Generator().manual_seed(4)
    student_head, teacher_head = torch.nn.Linear(6, 9, bias=False).double(), torch.nn.Linear(5, 13).double()
    student_hidden = torch.randn(7, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 8, (7,), generator=generator)
    student_rows = torch.tensor([0, 1, 2, 4, 5])
    teacher_hidden = torch.randn(5, 5, generator=generator, dtype=torch.float64)

    def reference():
        hidden = student_hidden.clone().requires_grad_()
        logits = student_head(hidden)[:, :8]  # vocab 8 of 9 rows: a padded head row is not a token
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)[:, :12]
        uld = torch.tensor(0.0, dtype=torch.float64)
        for pair, row in enumerate(student_rows.tolist()):
            uld = uld + uld_distance(logits[row:row + 1], teacher_logits[pair:pair + 1], 2.0).sum()
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        (0.3 * uld + 0.7 * ce).backward()
        return uld.detach(), ce.detach(), hidden.grad

    expected_uld, expected_ce, expected_grad = reference()
    assert float(expected_uld) > 0.1
    for chunk in (1, 2, 3, 100):
        student_head.zero_grad()
        hidden = student_hidden.clone().requires_grad_()
        uld, ce = chunked_uld_loss(student_head, hidden, targets, 8, student_rows, teacher_head, teacher_hidden, 12,
                                   2.0, chunk=chunk)
        (0.3 * uld + 0.7 * ce).backward()
        torch.testing.assert_close(uld, expected_uld)
        torch.testing.assert_close(ce, expected_ce)
        torch.testing.assert_close(hidden.grad, expected_grad)
    empty = torch.zeros(0, 6, dtype=torch.float64, requires_grad=True)
    uld, ce = chunked_uld_loss(student_head, empty, targets[:0], 8, student_rows[:0], teacher_head,
                               teacher_hidden[:0], 12, 1.0)
    (uld + ce).backward()
    assert uld.item() == 0 and ce.item() == 0


# ---- alignment ---------------------------------------------------------------------------------------------

def test_alignment_pairs_the_kth_targets_and_truncates_to_the_shorter():
    # Record 0: student targets at positions 1,2,3 (3), teacher at 2,3 (2). Record 1: student 1, teacher 4.
    student = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    teacher = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    student_rows, teacher_rows = align_completions(student, teacher)
    # Selected positions, row-major: student [r0: 0 1 2 | r1: 3], teacher [r0: 0 1 | r1: 2 3 4 5].
    assert student_rows.tolist() == [0, 1, 3] and teacher_rows.tolist() == [0, 1, 2]
    empty = torch.zeros(2, 5, dtype=torch.bool)
    assert align_completions(empty, teacher)[0].numel() == 0


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (spaces dropped): a much finer tokenization than the word one."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *sorted({c for w in SYNTHETIC_WORDS for c in w})]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Split(Regex("."), behavior="isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def test_alignment_of_two_real_tokenizations_of_the_same_completions():
    records = [{"prompt": "the cat", "completion": "sees a dog ."}, {"prompt": "", "completion": "birds"},
               {"prompt": "some dogs", "completion": "chase the big robot ."}]
    words, chars = make_word_tokenizer(SYNTHETIC_WORDS), char_tokenizer()
    word_tokens = tokenize_for_lm("prompt_completion", records, words, 64, packing=False)
    char_tokens = tokenize_for_lm("prompt_completion", records, chars, 64, packing=False)
    word_rows, char_rows = align_completions(word_tokens["loss_mask"], char_tokens["loss_mask"])
    # Completion targets (+ eos): words 5, 1, 6; characters 10, 5, 18 (with an empty prompt nothing
    # predicts the first completion token). The pairs stop at the shorter side, here always the words.
    assert word_tokens["loss_mask"][:, 1:].sum(1).tolist() == [5, 1, 6]
    assert char_tokens["loss_mask"][:, 1:].sum(1).tolist() == [10, 5, 18]
    assert word_rows.tolist() == list(range(12))
    assert char_rows.tolist() == [*range(0, 5), 10, *range(15, 21)]
    # The first pair of record 2 is the prediction of its first completion token on both sides.
    _, word_targets = shifted(word_tokens["input_ids"].unsqueeze(-1), word_tokens["input_ids"],
                              word_tokens["loss_mask"])
    _, char_targets = shifted(char_tokens["input_ids"].unsqueeze(-1), char_tokens["input_ids"],
                              char_tokens["loss_mask"])
    assert words.decode(word_targets[word_rows[6]]) == "chase" and chars.decode(char_targets[char_rows[6]]) == "c"


# ---- training with a student whose tokenizer differs --------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("uld")
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    corpus = synthetic_language(400, seed=3)
    documents = [" ".join(corpus[i:i + 4]) for i in range(0, len(corpus), 4)]
    teacher = train_language_model(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64), tokenizer,
                                   documents, steps=60, block=32, batch=8)
    save_model_dir(teacher, tokenizer, root / "teacher")
    # The student's tokenizer: the same words in another order, plus words the teacher doesn't know.
    student_tokenizer = make_word_tokenizer(list(reversed(SYNTHETIC_WORDS)) + ["zebra", "violet", "quantum"])
    assert student_tokenizer("the cat")["input_ids"] != tokenizer("the cat")["input_ids"]
    save_model_dir(tiny_llama(student_tokenizer, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
                   student_tokenizer, root / "llama_student")
    dropout = tiny_gpt2(student_tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    dropout.config.resid_pdrop = dropout.config.embd_pdrop = 0.1  # so the checkpointed RNG state matters
    save_model_dir(dropout, student_tokenizer, root / "gpt2_student")
    sentences = synthetic_language(120, seed=5)
    (root / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": " ".join(s.split()[:3]), "completion": " ".join(s.split()[3:])}) + "\n"
        for s in sentences))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences[:60]))
    return root


def uld_spec(files, student: str = "llama_student", data: str = "pairs.jsonl", **hyperparameters) -> JobSpec:
    return JobSpec.from_dict({
        "task": "causal_lm", "teacher": str(files / "teacher"), "training_file": str(files / data),
        "student": {"path": str(files / student)}, "loss": {"type": "uld"}, "validation_split": 0.25,
        "hyperparameters": {"epochs": 4, "batch_size": 8, "learning_rate": 3e-3, **hyperparameters},
        "data": {"max_length": 32}})


def test_the_uld_recipe_runs_uld_jobs():
    assert get_recipe("causal_lm", "token", "uld") is CausalLMULD
    assert get_recipe("causal_lm", "token", "forward_kl") is not CausalLMULD


def objective_before_training(evaluation: dict, alpha: float) -> float:
    import math

    return alpha * evaluation["uld"]["validation_uld_before_training"] + \
        (1 - alpha) * math.log(evaluation["student"]["perplexity_before_training"])


@pytest.mark.parametrize("data", ["pairs.jsonl", "text.jsonl"])
def test_training_lowers_the_validation_loss_and_exports_the_students_tokenizer(files, tmp_path, data):
    events: list[tuple[str, dict]] = []
    result = run_distillation(uld_spec(files, data=data), tmp_path, device="cpu",
                              on_event=lambda kind, payload: events.append((kind, payload)))
    history, evaluation = result.history, result.evaluation
    losses = [record["validation_loss"] for record in history]
    assert losses[-1] < losses[0] < objective_before_training(evaluation, 0.5)
    assert history[-1]["validation_perplexity"] < evaluation["student"]["perplexity_before_training"]
    assert evaluation["uld"]["validation_uld"] < evaluation["uld"]["validation_uld_before_training"]
    assert evaluation["teacher"]["perplexity"] > 1 and evaluation["top1_agreement"] is None
    assert evaluation["uld"]["teacher_vocab_size"] != evaluation["uld"]["student_vocab_size"]
    (alignment,) = [payload for kind, payload in events if kind == "alignment"]
    assert alignment["aligned_positions"] == min(alignment["student_tokens"], alignment["teacher_tokens"]) > 0

    exported = AutoTokenizer.from_pretrained(result.model_path)
    assert exported.get_vocab() == AutoTokenizer.from_pretrained(files / "llama_student").get_vocab()
    assert exported.get_vocab() != AutoTokenizer.from_pretrained(files / "teacher").get_vocab()
    model = AutoModelForCausalLM.from_pretrained(result.model_path)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(exported)
    assert "uld" in (result.model_path / "README.md").read_text()


def test_pure_uld_moves_the_student_towards_the_teachers_sorted_distributions(files, tmp_path):
    """alpha = 1: no cross-entropy at all, so only the ULD gradient can lower the validation ULD."""
    result = run_distillation(uld_spec(files, epochs=3, alpha=1.0), tmp_path, device="cpu")
    ulds = [record["validation_uld"] for record in result.history]
    assert all(r["validation_loss"] == r["validation_uld"] for r in result.history)
    assert ulds[-1] < ulds[0] < result.evaluation["uld"]["validation_uld_before_training"]


def test_resumed_run_equals_uninterrupted_run(files, tmp_path):
    spec = uld_spec(files, student="gpt2_student", epochs=3, batch_size=4, gradient_accumulation_steps=2)
    straight = run_distillation(spec, tmp_path / "straight", device="cpu", checkpoint_interval_s=3600)

    out = tmp_path / "interrupted"
    interrupt_inside_epoch_two(spec, out)

    resumed = run_distillation(spec, out, device="cpu", checkpoint_interval_s=3600, resume=True)
    assert resumed.history == straight.history
    assert_same_tensors(straight.model_path / "model.safetensors", resumed.model_path / "model.safetensors")
