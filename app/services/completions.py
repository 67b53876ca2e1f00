"""OpenAI-compatible text generation from finished causal language models.

Non-streamed requests run one ``generate`` call per prompt. Streamed ones (``stream=true``) run
``generate`` in a thread that hands each new token to the response through a queue, so chunks
leave while the model generates; the HTTP side is a sync generator that Starlette iterates in its
threadpool, so the event loop never waits on the model.

Log-probabilities (``logprobs``) are ``log_softmax`` of the model's raw next-token logits at each
step, before temperature and top_p: the model's own distribution, as OpenAI reports it, not the
(sharpened or truncated) distribution a token was sampled from."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..errors import Unprocessable, openai_error
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..tables import ModelRecord
from .models import model_cache

log = logging.getLogger(__name__)
NO_PROBABILITY = -9999.0  # what OpenAI reports for a token the model gives no probability at all


@dataclass
class _LanguageModel:
    id: str
    model: object
    tokenizer: object
    lock: threading.Lock

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _language_model(record: ModelRecord) -> _LanguageModel:
    if record.task != "causal_lm":
        raise Unprocessable(f"model {record.id!r} is a {record.task} model, not a language model", param="model")
    (model, tokenizer), lock = model_cache().get(record)
    return _LanguageModel(record.id, model, tokenizer, lock)


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


def _stops(request) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


def _check_room(lm: _LanguageModel, prompt_ids: list[int], request) -> None:
    room = getattr(lm.model.config, "max_position_embeddings", None)
    if room is not None and len(prompt_ids) + request.max_tokens > room:
        raise Unprocessable(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                            f"model's context of {room} tokens", param="max_tokens")


def _generate_kwargs(lm: _LanguageModel, ids: torch.Tensor, request) -> dict:
    sample = request.temperature > 0
    return dict(attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens, do_sample=sample,
                temperature=request.temperature if sample else None, top_p=request.top_p if sample else None,
                pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=lm.tokenizer.eos_token_id)


def _kept_tokens(lm: _LanguageModel, sequence: list[int]) -> tuple[list[tuple[int, int]], bool, int]:
    """(step, token) pairs of the answer (up to EOS, padding dropped), whether EOS ended it, tokens used."""
    tokenizer, kept = lm.tokenizer, []
    for step, token in enumerate(sequence):
        if token == tokenizer.eos_token_id:
            return kept, True, len(kept) + 1
        if tokenizer.pad_token_id is not None and token == tokenizer.pad_token_id:
            continue
        kept.append((step, token))
    return kept, False, len(kept)


def _token_texts(tokenizer, tokens: list[int]) -> list[str]:
    """Each token's share of the decoded text (with its leading space), from a short window before it."""
    texts = []
    for i, token in enumerate(tokens):
        before = tokens[max(0, i - 4):i]
        head = tokenizer.decode(before, skip_special_tokens=True)
        both = tokenizer.decode(before + [token], skip_special_tokens=True)
        texts.append(both[len(head):] if both.startswith(head) else tokenizer.decode([token]))
    return texts


def _logprob(value: float) -> float:
    return value if value > NO_PROBABILITY else NO_PROBABILITY  # -inf is not JSON


@dataclass
class _Choice:
    text: str
    finish_reason: str
    tokens: list[str]          # with logprobs: the tokens of ``text``
    token_logprobs: list[float]
    top: list[list[tuple[str, float]]]


def _generate(lm: _LanguageModel, prompt_ids: list[int], request, top_k: int | None) -> tuple[list[_Choice], int]:
    """n choices for one tokenized prompt; returns (choices, completion tokens). With ``top_k`` (not
    None) each choice carries its tokens' log-probs and the ``top_k`` most likely tokens per step."""
    _check_room(lm, prompt_ids, request)
    tokenizer, stops = lm.tokenizer, _stops(request)
    ids = torch.tensor([prompt_ids], device=lm.device)
    with lm.lock, torch.no_grad(), _seeded_rng(request.seed, lm.device):
        output = lm.model.generate(ids, **_generate_kwargs(lm, ids, request), num_return_sequences=request.n,
                                   return_dict_in_generate=True, output_logits=top_k is not None)
    choices, used = [], 0
    for row, sequence in enumerate(output.sequences[:, ids.shape[1]:].tolist()):
        kept, ended, count = _kept_tokens(lm, sequence)
        used += count
        tokens = [t for _, t in kept]
        text, stopped = _cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
        choice = _Choice(text, "stop" if ended or stopped else "length", [], [], [])
        if top_k is not None:
            offset = 0
            for (step, token), piece in zip(kept, _token_texts(tokenizer, tokens)):
                if stopped and offset >= len(text):
                    break  # the rest lies past the stop sequence
                logprobs = torch.log_softmax(output.logits[step][row].float(), dim=-1)
                best = torch.topk(logprobs, min(top_k, logprobs.shape[-1])) if top_k else None
                choice.tokens.append(piece)
                choice.token_logprobs.append(_logprob(logprobs[token].item()))
                choice.top.append([] if best is None else
                                  [(tokenizer.decode([i]), _logprob(v)) for v, i in zip(best.values.tolist(),
                                                                                        best.indices.tolist())])
                offset += len(piece)
        choices.append(choice)
    return choices, used


def _legacy_logprobs(choice: _Choice, start: int) -> dict:
    offsets, at = [], start
    for piece in choice.tokens:
        offsets.append(at)
        at += len(piece)
    top = [{token: value for token, value in reversed(pairs)} for pairs in choice.top]  # best wins a clash
    return {"tokens": choice.tokens, "token_logprobs": choice.token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(choice: _Choice) -> dict:
    def entry(token: str, value: float) -> dict:
        return {"token": token, "logprob": value, "bytes": list(token.encode())}
    return {"content": [{**entry(token, value), "top_logprobs": [entry(t, v) for t, v in pairs]}
                        for token, value, pairs in zip(choice.tokens, choice.token_logprobs, choice.top)]}


# ---- streaming ---------------------------------------------------------------------------------------------

_END = object()


class _QueueStreamer(BaseStreamer):
    """Hands every token ``generate`` produces to a queue (the first ``put`` is the prompt: skipped)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(token)

    def end(self):
        self.queue.put(_END)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _tokens(lm: _LanguageModel, prompt_ids: list[int], request, cancel: threading.Event) -> Iterator[int]:
    """The generated tokens one by one, as ``generate`` (in its own thread) produces them."""
    streamer = _QueueStreamer()
    ids = torch.tensor([prompt_ids], device=lm.device)

    def run():
        try:
            with lm.lock, torch.no_grad(), _seeded_rng(request.seed, lm.device):
                lm.model.generate(ids, **_generate_kwargs(lm, ids, request), streamer=streamer,
                                  stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
        except BaseException as error:  # noqa: BLE001 - handed to the response, which reports it
            streamer.queue.put(error)
        finally:
            streamer.queue.put(_END)

    thread = threading.Thread(target=run, name=f"generate-{lm.id}", daemon=True)
    thread.start()
    try:
        while (item := streamer.queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()  # the client left or a stop sequence matched: generation ends at its next step


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop sequence (or are half a character)."""
    hold = max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
    return max(hold, len(text) - len(text.rstrip("\ufffd")))


def _text_deltas(lm: _LanguageModel, prompt_ids: list[int], request) -> Iterator[tuple[str, str | None, int]]:
    """(text delta, finish_reason on the last, completion tokens so far). The deltas add up to the text
    the same request gives unstreamed: the decoded tokens, cut at the first stop sequence."""
    tokenizer, stops, cancel = lm.tokenizer, _stops(request), threading.Event()
    tokens, sent, used, finish = [], "", 0, "length"
    for token in _tokens(lm, prompt_ids, request, cancel):
        used += 1
        if token == tokenizer.eos_token_id:
            finish = "stop"
            break
        if tokenizer.pad_token_id is not None and token == tokenizer.pad_token_id:
            continue
        tokens.append(token)
        text, stopped = _cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
        if stopped:
            finish = "stop"
            break
        safe = text[:len(text) - _held_back(text, stops)]
        if len(safe) > len(sent) and safe.startswith(sent):
            yield safe[len(sent):], None, used
            sent = safe
    cancel.set()
    text, stopped = _cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
    finish = "stop" if stopped else finish
    yield (text[len(sent):] if text.startswith(sent) else ""), finish, used


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _events(chunks: Iterator[dict], usage_chunk) -> Iterator[str]:
    """Server-Sent Events of the chunks, then the usage chunk if asked for, then ``data: [DONE]``. An
    error while generating becomes an ``error`` event (the openai client raises it) and ends the stream."""
    try:
        for chunk in chunks:
            yield _sse(chunk)
        if usage_chunk is not None:
            yield _sse(usage_chunk())
    except Exception:
        log.exception("streamed generation failed")
        yield _sse({"error": openai_error(500, "internal_error", "generation failed (this is a bug)")})
        return
    yield _sse("[DONE]")


def _check_stream(request, logprobs_param: str) -> None:
    if request.stream_options is not None and not request.stream:
        raise Unprocessable("stream_options is only allowed with stream=true", param="stream_options")
    if not request.stream:
        return
    if request.n != 1:
        raise Unprocessable("n must be 1 with stream=true (streaming several choices is not supported)", param="n")
    if getattr(request, "logprobs", None) not in (None, False):
        raise Unprocessable("logprobs is not supported with stream=true", param=logprobs_param)


# ---- the two endpoints -------------------------------------------------------------------------------------

def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _include_usage(request) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def complete(record: ModelRecord, request: CompletionRequest) -> dict | Iterator[str]:
    """A completion object, or with ``stream`` the Server-Sent Events to send (every check that can
    refuse the request runs before the first event)."""
    _check_stream(request, "logprobs")
    lm = _language_model(record)
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    encoded = [lm.tokenizer(prompt).input_ids for prompt in prompts]
    for prompt_ids in encoded:
        _check_room(lm, prompt_ids, request)
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": record.id}
    if request.stream:
        return _stream_completion(lm, encoded, request, head)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for prompt, prompt_ids in zip(prompts, encoded):
        generated, used = _generate(lm, prompt_ids, request, request.logprobs)
        prompt_tokens, completion_tokens = prompt_tokens + len(prompt_ids), completion_tokens + used
        for choice in generated:
            logprobs = _legacy_logprobs(choice, len(prompt)) if request.logprobs is not None else None
            choices.append({"text": choice.text, "index": len(choices), "logprobs": logprobs,
                            "finish_reason": choice.finish_reason})
    return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _stream_completion(lm: _LanguageModel, encoded: list[list[int]], request, head: dict) -> Iterator[str]:
    """One choice per prompt (index = the prompt's), generated one prompt after the other."""
    used = [0] * len(encoded)
    extra = {"usage": None} if _include_usage(request) else {}

    def chunks():
        for index, prompt_ids in enumerate(encoded):
            for delta, finish, used[index] in _text_deltas(lm, prompt_ids, request):
                if delta or finish:
                    yield {**head, "choices": [{"text": delta, "index": index, "logprobs": None,
                                                "finish_reason": finish}], **extra}

    usage = (lambda: {**head, "choices": [], "usage": _usage(sum(map(len, encoded)), sum(used))}) \
        if _include_usage(request) else None
    return _events(chunks(), usage)


def chat(record: ModelRecord, request: ChatCompletionRequest) -> dict | Iterator[str]:
    _check_stream(request, "logprobs")
    if request.top_logprobs is not None and not request.logprobs:
        raise Unprocessable("top_logprobs needs logprobs=true", param="top_logprobs")
    lm = _language_model(record)
    tokenizer = lm.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise Unprocessable(f"model {record.id!r} has no chat template; use POST /v1/completions", param="model")
    messages = [m.model_dump() for m in request.messages]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    prompt_ids = list(prompt_ids)
    _check_room(lm, prompt_ids, request)
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": record.id}
    if request.stream:
        return _stream_chat(lm, prompt_ids, request, head)
    top_k = (request.top_logprobs or 0) if request.logprobs else None
    generated, used = _generate(lm, prompt_ids, request, top_k)
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c) if request.logprobs else None,
                "finish_reason": c.finish_reason} for i, c in enumerate(generated)]
    return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt_ids), used)}


def _stream_chat(lm: _LanguageModel, prompt_ids: list[int], request, head: dict) -> Iterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if _include_usage(request) else {}
    used = [0]

    def chunk(delta: dict, finish: str | None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                **extra}

    def chunks():
        yield chunk({"role": "assistant", "content": ""}, None)
        for delta, finish, used[0] in _text_deltas(lm, prompt_ids, request):
            if delta:
                yield chunk({"content": delta}, None)
            if finish:
                yield chunk({}, finish)

    usage = (lambda: {**head, "choices": [], "usage": _usage(len(prompt_ids), used[0])}) \
        if _include_usage(request) else None
    return _events(chunks(), usage)
