"""OpenAI-compatible text generation from finished causal language models."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time

import torch

from ..errors import Unprocessable
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..tables import ModelRecord
from .models import model_cache


def _language_model(record: ModelRecord):
    if record.task != "causal_lm":
        raise Unprocessable(f"model {record.id!r} is a {record.task} model, not a language model", param="model")
    return model_cache().get(record)


# Seeded generations run one at a time across all models: fork_rng saves and restores the
# process-wide generators, so two overlapping seeded runs would sample from (and leave behind)
# each other's seeds. Unseeded runs take no lock; their randomness is not meant to repeat.
_seeded = threading.Lock()


@contextlib.contextmanager
def _seeded_rng(seed: int | None, device: torch.device):
    """Seed sampling on ``device`` for the block, then put the process's RNG state back.

    HF ``generate`` takes no ``torch.Generator``, so it samples from the default generators:
    those of the CPU and of the model's CUDA device are saved, seeded and restored. Seeding
    them one by one (not ``torch.manual_seed``) leaves other GPUs alone and queues no seed
    for a CUDA that is not initialised yet. Without a seed nothing is touched."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with _seeded, torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _generate(record: ModelRecord, prompt_ids: list[int], request) -> tuple[list[dict], int]:
    """n choices for one tokenized prompt; returns (choices, completion tokens)."""
    (model, tokenizer), lock = _language_model(record)
    device = next(model.parameters()).device
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    sample = request.temperature > 0
    ids = torch.tensor([prompt_ids], device=device)
    room = model.config.max_position_embeddings if hasattr(model.config, "max_position_embeddings") else None
    if room is not None and len(prompt_ids) + request.max_tokens > room:
        raise Unprocessable(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                            f"model's context of {room} tokens", param="max_tokens")
    with lock, torch.no_grad(), _seeded_rng(request.seed, device):
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens,
                                do_sample=sample, temperature=request.temperature if sample else None,
                                top_p=request.top_p if sample else None, num_return_sequences=request.n,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    choices, used = [], 0
    for sequence in output[:, ids.shape[1]:].tolist():
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
            sequence = [t for t in sequence if t != tokenizer.pad_token_id]
        ended = tokenizer.eos_token_id in sequence
        if ended:
            sequence = sequence[:sequence.index(tokenizer.eos_token_id)]
        used += len(sequence) + int(ended)
        text, stopped = _cut_at_stop(tokenizer.decode(sequence, skip_special_tokens=True), stops)
        choices.append({"text": text, "finish_reason": "stop" if ended or stopped else "length"})
    return choices, used


def complete(record: ModelRecord, request: CompletionRequest) -> dict:
    (_, tokenizer), _ = _language_model(record)
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for prompt in prompts:
        prompt_ids = tokenizer(prompt).input_ids
        generated, used = _generate(record, prompt_ids, request)
        prompt_tokens, completion_tokens = prompt_tokens + len(prompt_ids), completion_tokens + used
        for choice in generated:
            choices.append({"text": choice["text"], "index": len(choices), "logprobs": None,
                            "finish_reason": choice["finish_reason"]})
    return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": record.id, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def chat(record: ModelRecord, request: ChatCompletionRequest) -> dict:
    (_, tokenizer), _ = _language_model(record)
    if not getattr(tokenizer, "chat_template", None):
        raise Unprocessable(f"model {record.id!r} has no chat template; use POST /v1/completions", param="model")
    messages = [m.model_dump() for m in request.messages]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    generated, used = _generate(record, list(prompt_ids), request)
    choices = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                "finish_reason": c["finish_reason"]} for i, c in enumerate(generated)]
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": record.id, "choices": choices, "usage": _usage(len(prompt_ids), used)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
