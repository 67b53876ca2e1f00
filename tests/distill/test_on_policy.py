"""On-policy distillation (method on_policy): the student samples, the teacher scores.

What is checked: the rollout layout and its loss mask (prompt, and what follows the first
eos, never count); the loss on a sampled batch equals a direct full-logits computation on
HF's own left-padded generate output, in value and gradient; lambda 0 is exactly the
token-level recipe; which batches are on-policy is deterministic and about lambda; a
resumed run is bit-identical; the student's reverse KL on its own samples falls; the
engine refuses data it can't run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill.errors import MismatchError
from distill.loop import epoch_order
from distill.recipes import RunContext, get_recipe
from distill.sampling import completion_mask, layout, on_policy_batch, sample_completions
from distill.spec import JobSpec
from distill.train import run_distillation
from tests.distill.resume_helpers import assert_same_tensors, interrupt_inside_epoch_two
from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language,
                                        tiny_gpt2)
from tests.factories import train_language_model

EOS, PAD = 2, 1  # make_word_tokenizer's ids


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small GPT-2 teacher trained on the synthetic language (it ends sentences with '. <eos>'),
    prompt/completion, prompt-only and plain-text files."""
    root = tmp_path_factory.mktemp("on_policy")
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    corpus = synthetic_language(800, seed=3)
    documents = [" ".join(corpus[i:i + 2]) for i in range(0, len(corpus), 2)]
    teacher = train_language_model(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64), tokenizer,
                                   documents, steps=150, block=32)
    save_model_dir(teacher, tokenizer, root / "lm")
    sentences = synthetic_language(80, seed=5)

    def split(sentence: str) -> dict:
        words = sentence.split()
        return {"prompt": " ".join(words[:2]), "completion": " ".join(words[2:])}

    (root / "pairs.jsonl").write_text("".join(json.dumps(split(s)) + "\n" for s in sentences[:48]))
    (root / "val_pairs.jsonl").write_text("".join(json.dumps(split(s)) + "\n" for s in sentences[48:64]))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": split(s)["prompt"]}) + "\n"
                                                for s in sentences[48:64]))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    return root


def _spec(files, **overrides) -> JobSpec:
    body = {"task": "causal_lm", "method": "on_policy", "teacher": str(files / "lm"),
            "training_file": str(files / "pairs.jsonl"), "validation_file": str(files / "prompts.jsonl"),
            "student": {"derive": {"num_layers": 1}}, "on_policy": {"lambda": 1.0, "max_new_tokens": 12},
            "hyperparameters": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "seed": 0},
            "data": {"max_length": 32}}
    for key, value in overrides.items():
        body[key] = {**body[key], **value} if key in ("hyperparameters", "on_policy") else value
    return JobSpec.from_dict(body)


def _recipe(spec: JobSpec, out_dir):
    ctx = RunContext(device=torch.device("cpu"), out_dir=out_dir, on_event=lambda kind, data: None,
                     should_stop=lambda: False)
    recipe = get_recipe(spec.task, spec.method, spec.loss.type)(spec, ctx)
    torch.manual_seed(spec.hyperparameters.seed)
    recipe.prepare()
    return recipe


# ---- the rollout's layout ----------------------------------------------------------------------------------

def test_rollout_mask_keeps_sampled_tokens_up_to_the_first_eos():
    new_tokens = torch.tensor([[7, 8, EOS, PAD, PAD],    # stops: eos counts, the padding after it not
                               [9, 9, 9, 9, 9],          # cut by max_new_tokens: all count
                               [EOS, PAD, PAD, PAD, PAD],  # immediate eos: just the eos
                               [5, EOS, 6, EOS, PAD]])   # only up to the FIRST eos
    assert completion_mask(new_tokens, EOS).tolist() == [[True, True, True, False, False], [True] * 5,
                                                         [True, False, False, False, False],
                                                         [True, True, False, False, False]]
    prompts = [[3, 4, 5], [6], [10, 11], [12, 13, 14, 15]]
    rollout = layout(prompts, new_tokens, EOS, PAD)
    assert rollout.completion_lengths == [3, 5, 1, 2] and rollout.finished == [True, False, True, True]
    assert rollout.input_ids.tolist() == [[3, 4, 5, 7, 8, EOS], [6, 9, 9, 9, 9, 9],
                                          [10, 11, EOS, PAD, PAD, PAD], [12, 13, 14, 15, 5, EOS]]
    assert rollout.attention_mask.tolist() == [[1] * 6, [1] * 6, [1] * 3 + [0] * 3, [1] * 6]
    assert rollout.loss_mask.long().tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1],
                                                 [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    assert rollout.count == 3 + 5 + 1 + 2


def test_sampling_never_draws_padded_vocabulary_rows_and_greedy_is_deterministic():
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    shared = len(tokenizer)
    model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, vocab_size=shared + 8)
    # Make the padding rows the likeliest tokens by far: only the cut keeps them out.
    model.lm_head.register_forward_hook(lambda module, args, out: out + torch.cat(
        [torch.zeros(shared), torch.full((8,), 50.0)]))
    prompts = [[5, 6], [7, 8, 9, 10], [3]]
    torch.manual_seed(0)
    cut = sample_completions(model, prompts, 8, 1.0, 0.9, EOS, PAD, shared, torch.device("cpu"))
    sampled = cut.input_ids[cut.loss_mask]
    assert sampled.numel() >= 3 and int(sampled.max()) < shared
    uncut = sample_completions(model, prompts, 8, 1.0, 1.0, EOS, PAD, None, torch.device("cpu"))
    assert int(uncut.input_ids[uncut.loss_mask].min()) >= shared  # the control: without the cut they win
    model.train()
    greedy = [sample_completions(model, prompts, 6, 0.0, 1.0, EOS, PAD, shared, torch.device("cpu"))
              for _ in range(2)]
    assert torch.equal(greedy[0].input_ids, greedy[1].input_ids) and model.training  # mode restored


# ---- the loss ----------------------------------------------------------------------------------------------

def _direct_loss(recipe, generated: torch.Tensor, prompt_width: int, prompt_mask: torch.Tensor, alpha: float,
                 temperature: float) -> tuple[torch.Tensor, int]:
    """The objective straight from HF's left-padded generate output: full logits of both models
    (positions from the attention mask, as generate uses them), log-softmax, mask by hand."""
    new = generated[:, prompt_width:]
    keep = torch.zeros_like(new, dtype=torch.bool)
    for row in range(new.shape[0]):
        for col in range(new.shape[1]):
            keep[row, col] = True
            if new[row, col] == EOS:
                break
    attention = torch.cat([prompt_mask, keep.long()], dim=1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    student = recipe.model(input_ids=generated, attention_mask=attention, position_ids=positions).logits
    with torch.no_grad():
        teacher = recipe.teacher_model(input_ids=generated, attention_mask=attention, position_ids=positions).logits
    # logits at t predict token t+1: the sampled tokens are generated[:, prompt_width:]
    s = student[:, prompt_width - 1:-1][keep]  # (N, V)
    t = teacher[:, prompt_width - 1:-1][keep]
    targets = new[keep]
    log_q, log_p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    reverse_kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(student ‖ teacher) per token
    ce = F.cross_entropy(s, targets, reduction="none")
    count = int(keep.sum())
    return (alpha * temperature**2 * reverse_kl + (1 - alpha) * ce).sum() / count, count


def test_loss_on_sampled_tokens_equals_a_direct_computation(files, tmp_path):
    alpha, temperature = 0.7, 2.0
    spec = _spec(files, hyperparameters={"alpha": alpha, "temperature": temperature},
                 on_policy={"lambda": 1.0, "max_new_tokens": 12, "temperature": 1.0})
    recipe = _recipe(spec, tmp_path)
    recipe.model.train()
    indices = epoch_order(0, recipe.num_examples, 0)[:8]
    # Long prompts, so rows differ in prompt length (left padding in generate, right padding in the rollout).
    for i, extra in zip(indices.tolist()[:3], ([20, 21, 22], [23], [24, 25])):
        recipe.prompts[i] = extra + recipe.prompts[i]
    prompts = [recipe.prompts[i] for i in indices.tolist()]

    torch.manual_seed(123)
    loss, count = recipe.batch_loss(indices)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in recipe.model.named_parameters()}
    recipe.model.zero_grad(set_to_none=True)

    # The same draw, from HF generate called directly with the same RNG state.
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    prompt_mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]).long()
    torch.manual_seed(123)
    recipe.model.eval()
    with torch.no_grad():
        generated = recipe.model.generate(input_ids=ids, attention_mask=prompt_mask, do_sample=True, top_k=0,
                                          temperature=1.0, top_p=1.0, max_new_tokens=12, eos_token_id=EOS,
                                          pad_token_id=PAD)
    recipe.model.train()
    lengths = completion_mask(generated[:, width:], EOS).sum(1)
    assert ((lengths < generated.shape[1] - width) & (lengths < lengths.max())).any(), \
        "the batch should hold a completion that stopped early, followed by padding"
    expected, expected_count = _direct_loss(recipe, generated, width, prompt_mask, alpha, temperature)
    expected.backward()

    assert count == expected_count == int(lengths.sum())
    assert torch.allclose(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for name, p in recipe.model.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_lambda_zero_is_the_token_level_recipe(files, tmp_path):
    """No sampling at all: the same weights bit for bit as method token on the same pairs."""
    common = {"validation_file": str(files / "val_pairs.jsonl"), "loss": {"type": "reverse_kl"}}
    on_policy = run_distillation(_spec(files, on_policy={"lambda": 0.0}, **common), tmp_path / "on_policy",
                                 device="cpu")
    token = run_distillation(_spec(files, method="token", **common), tmp_path / "token", device="cpu")
    assert [r["train_loss"] for r in on_policy.history] == [r["train_loss"] for r in token.history]
    expected, got = load_file(str(token.model_path / "model.safetensors")), \
        load_file(str(on_policy.model_path / "model.safetensors"))
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    # With reference completions the usual report is there too, beside the on-policy one.
    evaluation = on_policy.evaluation
    assert evaluation["student"]["perplexity"] == token.evaluation["student"]["perplexity"]
    assert evaluation["on_policy"]["before"]["reverse_kl"] > 0 and evaluation["on_policy"]["lambda"] == 0.0


# ---- which batches sample -------------------------------------------------------------------------------------

def test_on_policy_choice_is_deterministic_and_about_lambda():
    keys = [(epoch, batch) for epoch in range(20) for batch in range(100)]
    for lambda_ in (0.25, 0.5, 0.8):
        choices = [on_policy_batch(7, e, b, lambda_) for e, b in keys]
        assert choices == [on_policy_batch(7, e, b, lambda_) for e, b in keys]
        assert abs(sum(choices) / len(choices) - lambda_) < 0.03
    assert all(on_policy_batch(7, e, b, 1.0) for e, b in keys)
    assert not any(on_policy_batch(7, e, b, 0.0) for e, b in keys)
    assert [on_policy_batch(7, e, b, 0.5) for e, b in keys] != [on_policy_batch(8, e, b, 0.5) for e, b in keys]


def test_recipe_samples_exactly_the_chosen_batches(files, tmp_path):
    spec = _spec(files, on_policy={"lambda": 0.5}, hyperparameters={"batch_size": 4})
    recipe = _recipe(spec, tmp_path)
    sampled = []
    rollout = recipe.rollout
    recipe.rollout = lambda prompts: sampled.append(len(prompts)) or rollout(prompts)
    batches = recipe.num_examples // 4
    for epoch in range(2):
        order = epoch_order(0, recipe.num_examples, epoch)
        expected = [on_policy_batch(0, epoch, b, 0.5) for b in range(batches)]
        sampled.clear()
        for b in range(batches):
            recipe.position = (epoch, b)  # as the loop sets it before every batch
            loss, count = recipe.batch_loss(order[b * 4:(b + 1) * 4])
            assert count > 0 and torch.isfinite(loss)
        assert len(sampled) == sum(expected) and 0 < sum(expected) < batches
        # Validation samples with a seed of its own: the same numbers twice, the training RNG untouched.
        rng = torch.get_rng_state()
        assert recipe.on_policy_metrics() == recipe.on_policy_metrics()
        assert torch.equal(rng, torch.get_rng_state())
        recipe.validate()


# ---- resume, learning, export --------------------------------------------------------------------------------

def test_resumed_run_equals_uninterrupted_run(files, tmp_path):
    spec = _spec(files, on_policy={"lambda": 0.5, "temperature": 1.0, "max_new_tokens": 8},
                 student={"architecture": {"kind": "hf", "config": {"n_layer": 1, "resid_pdrop": 0.1,
                                                                     "embd_pdrop": 0.1}}},
                 hyperparameters={"epochs": 3, "batch_size": 4, "learning_rate": 3e-3})
    straight = run_distillation(spec, tmp_path / "straight", device="cpu", checkpoint_interval_s=3600)

    out = tmp_path / "interrupted"
    interrupt_inside_epoch_two(spec, out)
    resumed = run_distillation(spec, out, device="cpu", checkpoint_interval_s=3600, resume=True)

    assert resumed.history == straight.history
    assert_same_tensors(straight.model_path / "model.safetensors", resumed.model_path / "model.safetensors")
    assert resumed.evaluation["on_policy"] == straight.evaluation["on_policy"]


def test_reverse_kl_on_own_samples_falls(files, tmp_path):
    events: list[tuple[str, dict]] = []
    spec = _spec(files, hyperparameters={"epochs": 4, "alpha": 1.0})
    result = run_distillation(spec, tmp_path, device="cpu", on_event=lambda kind, data: events.append((kind, data)))
    stage = next(data for kind, data in events if kind == "stage" and data["stage"] == "on_policy")
    assert stage["lambda"] == 1.0 and stage["max_new_tokens"] == 12

    before = result.evaluation["on_policy"]["before"]
    curve = [r["validation_on_policy_reverse_kl"] for r in result.history]
    assert curve[-1] < 0.4 * before["reverse_kl"], (before["reverse_kl"], curve)
    assert result.evaluation["on_policy"]["after"]["reverse_kl"] == curve[-1]
    assert all(r["validation_sampled_tokens"] > 0 and r["validation_teacher_nll"] > 0 for r in result.history)
    # Prompt-only validation: no reference completions, so no perplexity (None, not a crash).
    assert result.evaluation["student"]["perplexity"] is None and result.evaluation["speedup"] > 0

    model = AutoModelForCausalLM.from_pretrained(result.model_path)
    assert model.config.n_layer == 1 and "on_policy" in (result.model_path / "README.md").read_text()


# ---- refusals -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, param", [
    ({"training_file": "prompts.jsonl", "on_policy": {"lambda": 0.5}}, "on_policy.lambda"),
    ({"training_file": "text.jsonl"}, "training_file"),
    ({"validation_file": "text.jsonl"}, "validation_file"),
    ({"on_policy": {"max_new_tokens": 32}}, "on_policy.max_new_tokens"),
])
def test_engine_refuses_data_it_cannot_run(files, tmp_path, overrides, param):
    overrides = {k: str(files / v) if k.endswith("_file") else v for k, v in overrides.items()}
    with pytest.raises(MismatchError) as caught:
        run_distillation(_spec(files, **overrides), tmp_path, device="cpu")
    assert caught.value.param == param


def test_prompts_only_with_lambda_one_and_a_lora_student(files, tmp_path):
    """Prompts alone train (every batch samples); a PEFT-wrapped student samples and exports merged."""
    spec = _spec(files, training_file=str(files / "prompts.jsonl"), hyperparameters={"epochs": 1},
                 student={"derive": {"num_layers": 1}, "lora": {"r": 4}})
    result = run_distillation(spec, tmp_path, device="cpu")
    assert result.history[0]["train_loss"] > 0 and result.history[0]["skipped_batches"] == 0
    student = result.evaluation["student"]
    assert 0 < student["trainable_parameters"] < student["parameters"]
    assert AutoModelForCausalLM.from_pretrained(result.model_path).config.n_layer == 1
