"""Several teachers: the mixture of their probabilities at temperature T, against a hand computation,
and MLP jobs that train on it."""

import math

import pytest
import torch
import torch.nn.functional as F

import distill.train
from distill.errors import MismatchError, SpecError
from distill.models import MLP, MLPArchitecture, save_model
from distill.recipes._teachers import MixtureClassifier, MixtureLM, mixture_logits
from distill.spec import JobSpec


def test_mixture_is_the_weighted_average_of_probabilities():
    torch.manual_seed(0)
    a, b, c = torch.randn(5, 7), torch.randn(5, 7) * 3, torch.randn(5, 7)
    weights, temperature = [0.5, 0.3, 0.2], 2.5
    mixed = mixture_logits([a, b, c], weights, temperature)
    by_hand = 0.5 * F.softmax(a / 2.5, -1) + 0.3 * F.softmax(b / 2.5, -1) + 0.2 * F.softmax(c / 2.5, -1)
    assert torch.allclose(F.softmax(mixed / temperature, -1), by_hand, atol=1e-6)
    assert torch.allclose(mixed, temperature * by_hand.log(), atol=1e-5)  # the logits are T · log p


def test_one_teacher_passes_through_untouched():
    logits = torch.randn(3, 4)
    assert mixture_logits([logits], [1.0], 4.0) is logits


def test_equal_teachers_mix_to_the_same_distribution():
    logits = torch.randn(4, 6)
    mixed = mixture_logits([logits, logits.clone()], [0.25, 0.75], 3.0)
    assert torch.allclose(F.softmax(mixed / 3.0, -1), F.softmax(logits / 3.0, -1), atol=1e-6)


class _Split:
    """A stand-in LM teacher: body = hidden states, head = a linear map to the vocabulary."""

    split = True

    def __init__(self, width, vocab, seed):
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(vocab, width, generator=generator)
        self.head_weight = torch.randn(vocab + 3, width, generator=generator)  # padded rows, cut to `shared`

    def body(self, ids, mask):
        return self.embed[ids]

    def head(self, hidden):
        return hidden @ self.head_weight.T


def test_lm_mixture_splits_hidden_states_and_mixes_per_chunk():
    vocab, temperature = 11, 1.5
    first, second = _Split(4, vocab, 1), _Split(6, vocab, 2)
    mixture = MixtureLM([first, second], [0.6, 0.4], temperature, shared=vocab)
    ids = torch.randint(0, vocab, (2, 5))
    hidden = mixture.body(ids, torch.ones_like(ids))
    assert hidden.shape == (2, 5, 10)
    mixed = mixture.head(hidden[:, 2:4])  # a chunk of positions, as the chunked loss applies it
    expected = (0.6 * F.softmax(first.head(first.body(ids, None))[:, 2:4, :vocab] / temperature, -1)
                + 0.4 * F.softmax(second.head(second.body(ids, None))[:, 2:4, :vocab] / temperature, -1))
    assert mixed.shape == (2, 2, vocab)
    assert torch.allclose(F.softmax(mixed / temperature, -1), expected, atol=1e-6)


def test_mixture_classifier_counts_every_teacher():
    teachers = [MLP(MLPArchitecture(input_dim=4, hidden_dims=[8], num_classes=3)),
                MLP(MLPArchitecture(input_dim=4, hidden_dims=[16], num_classes=3))]
    ensemble = MixtureClassifier(teachers, [0.5, 0.5], 2.0)
    x = torch.randn(3, 4)
    assert torch.allclose(ensemble(x), mixture_logits([t(x) for t in teachers], [0.5, 0.5], 2.0))
    assert sum(p.numel() for p in ensemble.parameters()) == sum(p.numel() for t in teachers for p in t.parameters())


# ---- MLP jobs ------------------------------------------------------------------------------------------------

def _weak_teacher(workspace, path, seed):
    """A second teacher of the same shape: the fixture teacher with noise on its weights."""
    torch.manual_seed(seed)
    teacher = MLP(MLPArchitecture(input_dim=4, hidden_dims=[32], num_classes=3))
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.5)
    return save_model(teacher, path)


def _spec(workspace, teachers, **changes):
    data = workspace.spec_dict(epochs=3)
    del data["teacher"]
    data["teachers"] = teachers
    data.update(changes)
    return JobSpec.from_dict(data, base_dir=workspace.root)


def test_job_trains_on_the_mixture_and_reports_every_teacher(workspace, tmp_path, fast_latency):
    other = _weak_teacher(workspace, workspace.root / "other_teacher.safetensors", seed=3)
    spec = _spec(workspace, [{"path": workspace.teacher_path.name, "weight": 3},
                             {"path": other.name, "weight": 1}])
    assert [w for _, w in spec.teacher_paths] == [0.75, 0.25]
    result = distill.train.run_distillation(spec, tmp_path / "run", device="cpu")
    teachers = result.evaluation["teachers"]
    assert [t["name"] for t in teachers] == ["teacher.safetensors", "other_teacher.safetensors"]
    assert [t["weight"] for t in teachers] == [0.75, 0.25]
    assert teachers[0]["accuracy"] > teachers[1]["accuracy"]  # the trained teacher beats the noisy one
    # "the teacher" in the report is the ensemble: its parameters are both teachers'
    assert result.evaluation["teacher"]["parameters"] == sum(t["parameters"] for t in teachers)
    # the student learned the mixture, which the trained teacher dominates
    assert teachers[0]["student_agreement"] > teachers[1]["student_agreement"]
    assert all(math.isfinite(r["train_loss"]) for r in result.history)


def test_mixture_target_equals_hand_mixture(workspace, tmp_path):
    """The recipe's soft targets are exactly T · log Σ w softmax(z / T) of the two teachers."""
    from distill.recipes import RunContext, get_recipe
    from distill.models import load_model
    from distill.teacher_signal import compute_logits

    other = _weak_teacher(workspace, workspace.root / "other_teacher2.safetensors", seed=4)
    spec = _spec(workspace, [{"path": workspace.teacher_path.name, "weight": 1},
                             {"path": other.name, "weight": 1}])
    ctx = RunContext(device=torch.device("cpu"), out_dir=tmp_path, on_event=lambda *a: None,
                     should_stop=lambda: False)
    recipe = get_recipe("classification", "token")(spec, ctx)
    recipe.prepare()
    temperature = spec.hyperparameters.temperature
    first = compute_logits(load_model(workspace.teacher_path), recipe.train_x, torch.device("cpu"))
    second = compute_logits(load_model(other), recipe.train_x, torch.device("cpu"))
    by_hand = 0.5 * F.softmax(first / temperature, -1) + 0.5 * F.softmax(second / temperature, -1)
    assert torch.allclose(F.softmax(recipe.teacher_logits / temperature, -1), by_hand, atol=1e-6)


def test_teachers_with_different_label_sets_are_refused(workspace, tmp_path):
    torch.manual_seed(0)
    other = save_model(MLP(MLPArchitecture(input_dim=4, hidden_dims=[8], num_classes=5)),
                       workspace.root / "five_classes.safetensors")
    spec = _spec(workspace, [{"path": workspace.teacher_path.name}, {"path": other.name}])
    with pytest.raises(MismatchError) as caught:
        distill.train.run_distillation(spec, tmp_path / "run", device="cpu")
    assert caught.value.param == "teachers[1]" and "label set" in caught.value.message


@pytest.mark.parametrize("change, param", [
    ({"teacher": "teacher.safetensors"}, "teacher"),  # both teacher and teachers
    ({"method": "sequence", "task": "causal_lm", "student": {"derive": {"num_layers": 1}}}, "teachers"),
    ({"task": "causal_lm", "student": {"path": "s"}, "loss": {"type": "uld"}}, "teachers"),
    ({"task": "causal_lm", "student": {"derive": {"num_layers": 1}}, "intermediate": {}}, "intermediate"),
])
def test_spec_rules(workspace, change, param):
    with pytest.raises(SpecError) as caught:
        _spec(workspace, [{"path": "a"}, {"path": "b"}], **change)
    assert caught.value.param == param


def test_one_entry_is_not_several_teachers(workspace):
    with pytest.raises(SpecError) as caught:
        _spec(workspace, [{"path": "a"}])
    assert caught.value.param.startswith("teachers")


# ---- causal LMs ----------------------------------------------------------------------------------------------

def _lm_spec(tmp_path, teachers: list[dict], **extra) -> JobSpec:
    import json

    from tests.distill.hf_factories import synthetic_language

    texts = [" ".join(synthetic_language(4, seed=i)) for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = {"task": "causal_lm", "teachers": teachers, "student": {"derive": {"num_layers": 1}},
            "training_file": str(tmp_path / "train.jsonl"), "validation_split": 0.2, "data": {"max_length": 32},
            "hyperparameters": {"epochs": 2, "batch_size": 8, "temperature": 2.0}, **extra}
    return JobSpec.from_dict(spec)


@pytest.fixture(scope="module")
def lm_teachers(tmp_path_factory):
    from tests.distill.hf_factories import SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, tiny_gpt2

    folder = tmp_path_factory.mktemp("lm_teachers")
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    torch.manual_seed(0)
    first = save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), tokenizer, folder / "first")
    second = save_model_dir(tiny_gpt2(tokenizer, n_layer=1, n_embd=48, n_head=2), tokenizer, folder / "second")
    other_words = make_word_tokenizer(list(reversed(SYNTHETIC_WORDS)))
    foreign = save_model_dir(tiny_gpt2(other_words, n_layer=1, n_embd=32, n_head=2), other_words, folder / "foreign")
    return first, second, foreign


@pytest.mark.parametrize("signal", [{}, {"teacher_signal": {"top_k": 5}}])
def test_lm_teachers_of_different_widths_train_on_the_mixture(tmp_path, lm_teachers, signal):
    from distill.recipes import RunContext, get_recipe
    from distill.losses import shifted

    first, second, _ = lm_teachers
    spec = _lm_spec(tmp_path, [{"path": str(first), "weight": 2}, {"path": str(second), "weight": 1}], **signal)
    result = distill.train.run_distillation(spec, tmp_path / "run", device="cpu")
    teachers = result.evaluation["teachers"]
    assert [t["name"] for t in teachers] == ["first", "second"] and [t["weight"] for t in teachers] == [2 / 3, 1 / 3]
    assert all(t["perplexity"] > 1 for t in teachers)
    assert result.evaluation["teacher"]["parameters"] == sum(t["parameters"] for t in teachers)

    # the recipe's teacher is the mixture: its next-token distribution at T is 2/3 p1 + 1/3 p2
    ctx = RunContext(device=torch.device("cpu"), out_dir=tmp_path / "probe", on_event=lambda *a: None,
                     should_stop=lambda: False)
    recipe = get_recipe("causal_lm", "token")(spec, ctx)
    recipe.prepare()
    assert isinstance(recipe.teacher, MixtureLM)
    ids, mask = recipe.tokens["input_ids"][:2], recipe.tokens["attention_mask"][:2]
    with torch.no_grad():
        mixed = recipe.teacher.head(recipe.teacher.body(ids, mask))
        p1 = F.softmax(recipe.teacher_model(input_ids=ids, attention_mask=mask).logits / 2.0, -1)
        p2 = F.softmax(recipe.extra_teachers[0](input_ids=ids, attention_mask=mask).logits / 2.0, -1)
    vocab = recipe.shared
    assert torch.allclose(F.softmax(mixed / 2.0, -1), (2 / 3 * p1 + 1 / 3 * p2)[..., :vocab], atol=1e-5)
    if signal:  # the stored top-k signal is the mixture's top-k
        select = recipe.tokens["loss_mask"][:2]
        expected = torch.log_softmax(shifted(mixed, ids, select)[0] / 2.0, -1).topk(5, -1).values
        stored = recipe.signal[torch.arange(2)][:, :-1][select[:, 1:]].logprobs
        assert torch.allclose(stored, expected, atol=1e-5)


def test_two_copies_of_one_teacher_train_like_that_teacher(tmp_path, lm_teachers):
    first, _, _ = lm_teachers
    alone = distill.train.run_distillation(
        JobSpec.from_dict({**_lm_spec(tmp_path, [{"path": str(first)}, {"path": str(first)}]).to_dict(),
                           "teachers": None, "teacher": str(first)}), tmp_path / "alone", device="cpu")
    twice = distill.train.run_distillation(_lm_spec(tmp_path, [{"path": str(first)}, {"path": str(first)}]),
                                           tmp_path / "twice", device="cpu")
    for a, b in zip(alone.history, twice.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_lm_teachers_must_share_a_tokenizer(tmp_path, lm_teachers):
    first, _, foreign = lm_teachers
    spec = _lm_spec(tmp_path, [{"path": str(first)}, {"path": str(foreign)}])
    with pytest.raises(MismatchError) as caught:
        distill.train.run_distillation(spec, tmp_path / "run", device="cpu")
    assert caught.value.param == "teachers[1]" and "share one tokenizer" in caught.value.message
