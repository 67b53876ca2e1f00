"""The OpenAI-shaped routes through the official ``openai`` client against the live stack: streamed
completions and chat (``stream=True``) add up to the unstreamed answer, errors show the server's
message in the exception's text, ``models.list()`` works, and ``logprobs`` are the model's own."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from .test_llm_e2e import download_model_dir

PROMPT = "the cat"
CHAT = [{"role": "user", "content": "the dog"}]


@pytest.fixture(scope="module")
def oai(api_url, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url + "/v1", api_key=api_key, max_retries=0, timeout=120)


# Prompts that stop mid-sentence. The student is trained for one epoch, and its greedy answer to a
# full phrase ("the cat") can be just ". <eos>". Which prompt it continues at length shifts with any
# change in training numerics, so the streaming test takes the first one that gets 3+ words.
LONG_PROMPTS = ["these red children quickly chase", "some robots follow", "the birds like the", "a teacher chases every",
                PROMPT]


def _long_answer(oai, lm, **options):
    for prompt in LONG_PROMPTS:
        whole = oai.completions.create(model=lm, prompt=prompt, **options)
        if len(whole.choices[0].text.split()) >= 3:
            return prompt, whole
    pytest.fail(f"no prompt of {LONG_PROMPTS} gets a greedy answer of 3 words or more")


@pytest.mark.parametrize("with_stop", [False, True])
def test_streamed_completion_adds_up_to_the_unstreamed_one(oai, lm, with_stop):
    options = dict(max_tokens=10, temperature=0, seed=3)
    prompt, whole = _long_answer(oai, lm, **options)
    options.update(model=lm, prompt=prompt)
    if with_stop:  # stop at the last word of the unstopped answer (the generation continues past it)
        words = whole.choices[0].text.split()
        assert len(words) >= 3, whole.choices[0].text
        options["stop"] = [" " + words[-1][:2]]
        whole = oai.completions.create(**options)
        assert whole.choices[0].finish_reason == "stop"
    chunks = list(oai.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text and whole.choices[0].text.strip()
    assert len([t for t in texts if t]) >= 2, texts  # delivered piece by piece, not at the end in one go
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    if not with_stop:  # a stop sequence ends the streamed generation early; unstreamed it is cut afterwards
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chat_adds_up_to_the_unstreamed_one(oai, lm):
    options = dict(model=lm, messages=CHAT, max_tokens=8, temperature=0, seed=5)
    whole = oai.chat.completions.create(**options)
    chunks = list(oai.chat.completions.create(**options, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == whole.choices[0].message.content and content.strip()
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert not any(c.choices[0].finish_reason for c in chunks[:-1])


def test_raw_event_stream_ends_with_done(client, lm):
    with client.stream("POST", "/completions", json={"model": lm, "prompt": PROMPT, "max_tokens": 4,
                                                     "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [block for block in raw.split("\n\n") if block]
    assert raw.endswith("\n\n") and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


@pytest.mark.parametrize("call, error, param, fragment", [
    (lambda o, m: o.completions.create(model=m, prompt=PROMPT, max_tokens=-1),
     openai.UnprocessableEntityError, "max_tokens", "greater than or equal to 1"),
    (lambda o, m: o.completions.create(model="model-" + "0" * 24, prompt=PROMPT),
     openai.NotFoundError, "model", "no model with id"),
    (lambda o, m: o.completions.create(model=m, prompt=PROMPT, echo=True),
     openai.UnprocessableEntityError, "echo", "not supported"),
    (lambda o, m: o.completions.create(model=m, prompt=PROMPT, presence_penalty=0.5),
     openai.UnprocessableEntityError, "presence_penalty", "not supported"),
    (lambda o, m: o.completions.create(model=m, prompt=PROMPT, logit_bias={"1": 5}),
     openai.UnprocessableEntityError, "logit_bias", "not supported"),
    (lambda o, m: o.completions.create(model=m, prompt=PROMPT, stream=True, n=2),
     openai.UnprocessableEntityError, "n", "stream"),
    (lambda o, m: o.completions.create(model=m, prompt=PROMPT, stream=True, logprobs=2),
     openai.UnprocessableEntityError, "logprobs", "stream"),
    (lambda o, m: o.chat.completions.create(model=m, messages=CHAT, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {}}}]), openai.UnprocessableEntityError, "tools", "not permitted"),
    (lambda o, m: o.chat.completions.create(model=m, messages=CHAT, top_logprobs=2),
     openai.UnprocessableEntityError, "top_logprobs", "logprobs"),
    (lambda o, m: o.chat.completions.create(model=m, messages=CHAT, response_format={"type": "json_object"}),
     openai.UnprocessableEntityError, "response_format.type", "text"),
], ids=["max_tokens", "unknown-model", "echo", "presence_penalty", "logit_bias", "stream-n", "stream-logprobs",
        "tools", "top_logprobs-alone", "json-mode"])
def test_refusals_show_the_message_and_param_in_the_openai_exception(oai, lm, call, error, param, fragment):
    with pytest.raises(error) as raised:
        call(oai, lm)
    body = raised.value.body  # the client keeps body["error"]
    assert body["param"] == param and fragment in body["message"], body
    assert body["type"] == "invalid_request_error" and body["code"]
    assert param in str(raised.value) and fragment in str(raised.value), str(raised.value)


def test_other_routes_keep_plain_problem_details(client):
    response = client.get("/files/file-" + "0" * 24)
    assert response.status_code == 404 and response.headers["content-type"].startswith("application/problem+json")
    assert "error" not in response.json() and response.json()["status"] == 404


def test_openai_routes_errors_are_problem_details_too(client):
    response = client.post("/completions", json={"model": "model-" + "0" * 24, "prompt": PROMPT})
    body = response.json()
    assert response.status_code == 404 and response.headers["content-type"].startswith("application/problem+json")
    assert body["status"] == 404 and body["param"] == "model" and body["error"]["param"] == "model"


def test_models_list_through_the_openai_client(oai, client, lm):
    listed = {m.id: m for m in oai.models.list()}
    assert lm in listed
    ours = client.get(f"/models/{lm}").json()
    assert listed[lm].object == "model" and listed[lm].created == ours["created_at"] > 0
    assert isinstance(listed[lm].owned_by, str) and listed[lm].owned_by == ours["owned_by"]
    assert oai.models.retrieve(lm).created == ours["created_at"]
    assert ours["task"] == "causal_lm" and "has_more" in client.get("/models").json()  # nothing else lost


def test_completion_logprobs_are_the_models_own(oai, client, lm, tmp_path):
    result = oai.completions.create(model=lm, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    choice = result.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) >= 1
    assert logprobs.text_offset[0] == len(PROMPT)
    assert all(b - a == len(t) for a, b, t in zip(logprobs.text_offset, logprobs.text_offset[1:], logprobs.tokens))
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3 and all(v <= 0 for v in top.values())
        assert chosen <= 0 and chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the best token

    # The same numbers from the downloaded model, computed here.
    model_dir = download_model_dir(client, lm, tmp_path)
    from transformers import AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
        generated = generated[:len(logprobs.tokens)]
        full = torch.tensor([prompt_ids + generated])
        expected = torch.log_softmax(model(full).logits[0, len(prompt_ids) - 1:-1].float(), dim=-1)
    mine = expected[torch.arange(len(generated)), torch.tensor(generated)]
    assert torch.allclose(mine, torch.tensor(logprobs.token_logprobs), atol=1e-4)


def test_chat_logprobs(oai, lm):
    result = oai.chat.completions.create(model=lm, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2)
    choice = result.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content and content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert all(t.logprob <= 0 for t in token.top_logprobs)
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-5)
    plain = oai.chat.completions.create(model=lm, messages=CHAT, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content
