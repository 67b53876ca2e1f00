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
