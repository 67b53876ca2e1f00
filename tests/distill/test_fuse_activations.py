"""fuse_activations: transformers' Python tanh-GELU modules swapped for the fused kernel — the same
function and gradients (to float32 rounding), the same saved model."""

import json

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

from distill.hf import fuse_activations


def _gpt2(activation: str = "gelu_new") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_positions=16, activation_function=activation,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_same_function_and_gradients_in_one_kernel():
    model, ids = _gpt2(), torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    assert sum(isinstance(m, NewGELUActivation) for m in model.modules()) == 2
    before, grads_before = _loss_and_grads(model, ids)
    assert fuse_activations(model) == 2
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert sum(isinstance(m, GELUTanh) for m in model.modules()) == 2
    after, grads_after = _loss_and_grads(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for name, grad in grads_before.items():
        torch.testing.assert_close(grads_after[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fuse_activations(model) == 0  # idempotent: nothing left to swap


def test_fast_gelu_matches_and_other_activations_are_left_alone():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(GELUTanh()(x), FastGELUActivation()(x), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(GELUTanh()(x), NewGELUActivation()(x), rtol=1e-7, atol=1e-9)
    relu = _gpt2("relu")
    assert fuse_activations(relu) == 0
    wrapped = torch.nn.Sequential(torch.nn.Linear(4, 4), FastGELUActivation())
    assert fuse_activations(wrapped) == 1 and isinstance(wrapped[1], GELUTanh)


def test_saved_model_unchanged(tmp_path):
    model = _gpt2()
    model.save_pretrained(tmp_path / "before")
    fuse_activations(model)
    model.save_pretrained(tmp_path / "after")
    config = json.loads((tmp_path / "after" / "config.json").read_text())
    assert config["activation_function"] == "gelu_new"
    assert json.loads((tmp_path / "before" / "config.json").read_text()) == config
    assert (tmp_path / "before" / "model.safetensors").read_bytes() == (tmp_path / "after" / "model.safetensors").read_bytes()
