"""OpenAI-compatible text generation from finished causal language models.

Every choice to generate (each prompt x ``n``) is one row of the generation batcher
(app/services/generation.py): concurrent requests for one model are decoded together, with left
padding and one KV cache, each row with its own sampling settings and seed. A request's rows are
queued before anything is sent (a full queue answers 503), then each row's tokens are read from its
own queue as they are generated: a streamed request (``stream=true``) sends them as chunks, an
unstreamed one waits for the end. The HTTP side is sync and Starlette runs it in its threadpool, so
the event loop never waits on the model.

A row whose text reaches a stop sequence is cancelled at once (it leaves its batch), streamed or not;
the text is cut before the stop sequence. With a ``seed``, choice ``j`` samples from its own generator
seeded with ``seed + j``, so a seeded request gives the same text alone or batched with others.

Log-probabilities (``logprobs``) are ``log_softmax`` of the model's raw next-token logits at each
step, before temperature and top_p: the model's own distribution, as OpenAI reports it, not the
(sharpened or truncated) distribution a token was sampled from."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import Unprocessable, openai_error
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..tables import ModelRecord
from .generation import Row, RowSpec, ServedLM, generation_batcher
from .models import model_cache

log = logging.getLogger(__name__)
NO_PROBABILITY = -9999.0  # what OpenAI reports for a token the model gives no probability at all


@dataclass
class _LanguageModel:
    id: str
    model: object
    tokenizer: object
    lock: threading.Lock
    key: str  # the model id + its weights' sha256: the batcher's queue

    def served(self) -> ServedLM:
        return ServedLM(self.key, self.model, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.lock)


def _language_model(record: ModelRecord) -> _LanguageModel:
    if record.task != "causal_lm":
        raise Unprocessable(f"model {record.id!r} is a {record.task} model, not a language model", param="model")
    (model, tokenizer), lock = model_cache().get(record)
    return _LanguageModel(record.id, model, tokenizer, lock, f"{record.id}:{record.sha256}")


def _submit(lm: _LanguageModel, prompts: list[list[int]], request, top_k: int | None) -> list[Row]:
    """Queue ``n`` rows per prompt (prompt-major) with the request's sampling settings."""
    sample = request.temperature > 0
    specs = [RowSpec(prompt_ids, request.max_tokens, request.temperature if sample else 0.0,
                     request.top_p if sample else 1.0, None if request.seed is None else request.seed + choice,
                     top_k)
             for prompt_ids in prompts for choice in range(request.n)]
    return generation_batcher().submit(lm.served(), specs)


def _encode(lm: _LanguageModel, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt starts from the beginning-of-text token (BOS, else EOS), as
    OpenAI's models start from ``<|endoftext|>``."""
    prompt_ids = list(lm.tokenizer(prompt).input_ids)
    if prompt_ids:
        return prompt_ids
    start = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    if start is None:
        raise Unprocessable("the prompt is empty and the model's tokenizer has no BOS or EOS token to start from",
                            param="prompt")
    return [start]


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


def _collect(lm: _LanguageModel, row: Row, stops: list[str], with_logprobs: bool) -> tuple[_Choice, int]:
    """One row's choice once it has ended, and the tokens it generated (EOS included). A stop sequence
    in the text cancels the row at once; the text is cut before it."""
    tokenizer, kept, used, ended = lm.tokenizer, [], 0, False
    try:
        for step in row.steps():
            used += 1
            if step.token == tokenizer.eos_token_id:
                ended = True
                break
            if tokenizer.pad_token_id is not None and step.token == tokenizer.pad_token_id:
                continue
            kept.append(step)
            if stops and _cut_at_stop(tokenizer.decode([s.token for s in kept], skip_special_tokens=True), stops)[1]:
                break
    finally:
        row.cancel()  # no-op when the row has ended; else it leaves its batch
    tokens = [step.token for step in kept]
    text, stopped = _cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
    choice = _Choice(text, "stop" if ended or stopped else "length", [], [], [])
    if with_logprobs:
        offset = 0
        for step, piece in zip(kept, _token_texts(tokenizer, tokens)):
            if stopped and offset >= len(text):
                break  # the rest lies past the stop sequence
            choice.tokens.append(piece)
            choice.token_logprobs.append(_logprob(step.logprob))
            choice.top.append([(tokenizer.decode([token]), _logprob(value)) for token, value in step.top])
            offset += len(piece)
    return choice, used


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

def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop sequence (or are half a character)."""
    hold = max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
    return max(hold, len(text) - len(text.rstrip("\ufffd")))


def _text_deltas(lm: _LanguageModel, row: Row, stops: list[str]) -> Iterator[tuple[str, str | None, int]]:
    """(text delta, finish_reason on the last, completion tokens so far) of one row as it is generated. The
    deltas add up to the text the same request gives unstreamed: the decoded tokens, cut at the first stop
    sequence (which also cancels the row, as leaving early does)."""
    tokenizer = lm.tokenizer
    tokens, sent, used, finish = [], "", 0, "length"
    try:
        for step in row.steps():
            used += 1
            if step.token == tokenizer.eos_token_id:
                finish = "stop"
                break
            if tokenizer.pad_token_id is not None and step.token == tokenizer.pad_token_id:
                continue
            tokens.append(step.token)
            text, stopped = _cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
            if stopped:
                finish = "stop"
                break
            safe = text[:len(text) - _held_back(text, stops)]
            if len(safe) > len(sent) and safe.startswith(sent):
                yield safe[len(sent):], None, used
                sent = safe
    finally:
        row.cancel()  # the client left or a stop sequence matched: the row leaves its batch at its next step
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
    refuse the request, the queue's room included, runs before the first event)."""
    _check_stream(request, "logprobs")
    lm = _language_model(record)
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    encoded = [_encode(lm, prompt) for prompt in prompts]
    for prompt_ids in encoded:
        _check_room(lm, prompt_ids, request)
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": record.id}
    rows = _submit(lm, encoded, request, None if request.stream else request.logprobs)
    if request.stream:
        return _stream_completion(lm, rows, encoded, request, head)
    choices, completion_tokens, stops = [], 0, _stops(request)
    for index, row in enumerate(rows):  # n rows per prompt, prompt-major
        choice, used = _collect(lm, row, stops, request.logprobs is not None)
        completion_tokens += used
        logprobs = _legacy_logprobs(choice, len(prompts[index // request.n])) if request.logprobs is not None else None
        choices.append({"text": choice.text, "index": index, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason})
    return {**head, "choices": choices, "usage": _usage(sum(map(len, encoded)), completion_tokens)}


def _stream_completion(lm: _LanguageModel, rows: list[Row], encoded: list[list[int]], request,
                       head: dict) -> Iterator[str]:
    """One choice per prompt (index = the prompt's): all generated at once, sent one after the other."""
    used = [0] * len(rows)
    extra = {"usage": None} if _include_usage(request) else {}
    stops = _stops(request)

    def chunks():
        try:
            for index, row in enumerate(rows):
                for delta, finish, used[index] in _text_deltas(lm, row, stops):
                    if delta or finish:
                        yield {**head, "choices": [{"text": delta, "index": index, "logprobs": None,
                                                    "finish_reason": finish}], **extra}
        finally:
            for row in rows:  # the client left: the rows not read yet stop too
                row.cancel()

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
    top_k = (request.top_logprobs or 0) if request.logprobs else None
    rows = _submit(lm, [prompt_ids], request, top_k)
    if request.stream:
        return _stream_chat(lm, rows[0], prompt_ids, request, head)
    generated = [_collect(lm, row, _stops(request), request.logprobs) for row in rows]
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c) if request.logprobs else None,
                "finish_reason": c.finish_reason} for i, (c, _) in enumerate(generated)]
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": _usage(len(prompt_ids), sum(used for _, used in generated))}


def _stream_chat(lm: _LanguageModel, row: Row, prompt_ids: list[int], request, head: dict) -> Iterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if _include_usage(request) else {}
    used = [0]

    def chunk(delta: dict, finish: str | None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                **extra}

    def chunks():
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            for delta, finish, used[0] in _text_deltas(lm, row, _stops(request)):
                if delta:
                    yield chunk({"content": delta}, None)
                if finish:
                    yield chunk({}, finish)
        finally:
            row.cancel()  # the client left before the first read

    usage = (lambda: {**head, "choices": [], "usage": _usage(len(prompt_ids), used[0])}) \
        if _include_usage(request) else None
    return _events(chunks(), usage)
