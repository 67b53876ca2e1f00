"""JSONL text datasets: kinds, errors naming the line, and the token tensors with their loss masks."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill.errors import DataError, SpecError  # noqa: E402
from distill.text_data import (  # noqa: E402
    inspect_text_dataset,
    load_text_records,
    tokenize_for_classification,
    tokenize_for_lm,
)
from tests.distill.hf_factories import SYNTHETIC_WORDS, make_word_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer(SYNTHETIC_WORDS)


def _write(tmp_path, lines: list, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    return path


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_kinds_are_detected(tmp_path):
    text = inspect_text_dataset(_write(tmp_path, [{"text": "the cat sees a dog ."}, "", {"text": "ab", "id": 7}]))
    assert text == {"format": "jsonl", "kind": "text", "rows": 2, "characters": 22}
    pc = inspect_text_dataset(_write(tmp_path, [{"prompt": "q", "completion": "the cat"},
                                                {"prompt": "", "completion": "a"}]))
    assert pc == {"format": "jsonl", "kind": "prompt_completion", "rows": 2, "characters": 9}
    labeled = inspect_text_dataset(_write(tmp_path, [{"text": "x", "label": 0}, {"text": "yy", "label": 4}]))
    assert labeled == {"format": "jsonl", "kind": "text_label", "rows": 2, "characters": 3, "num_labels": 5}
    kind, records = load_text_records(_write(tmp_path, [{"text": "x", "label": 2, "extra": [1]}]))
    assert kind == "text_label" and records == [{"text": "x", "label": 2, "line": 1}]


def test_line_numbers_split_on_newline_only(tmp_path):
    """U+2028 inside a JSON string must not shift the line count (str.splitlines would)."""
    path = _write(tmp_path, [{"text": "a\u2028b"}, '{"text": 5}'])
    with pytest.raises(DataError) as caught:
        inspect_text_dataset(path)
    assert caught.value.line == 2 and "line 2" in caught.value.message


@pytest.mark.parametrize("lines, line, fragment", [
    ([{"text": "ok"}, "{not json"], 2, "not valid JSON"),
    ([{"text": "ok"}, {"text": 3}], 2, "must be a string"),
    ([{"text": "ok"}, {"text": "   "}], 2, "empty"),
    ([{"text": "ok"}, {"prompt": "p", "completion": "c"}], 2, "one kind"),
    ([{"text": "a", "label": 1}, {"text": "b"}], 2, "one kind"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": -1}], 2, "label -1"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": 1.5}], 2, "must be an integer"),
    ([{"text": "a", "label": True}], 1, "must be an integer"),
    ([{"prompt": "p"}, {"prompt": "q", "completion": "c"}], 2, "one kind"),
    ([{"prompt": " "}], 1, "empty"),
    ([{"completion": "c"}], 1, "'prompt' is missing"),
    ([{"prompt": "p", "completion": ""}], 1, "empty"),
    ([{"prompt": "p", "completion": "c", "text": "t"}], 1, "mixes"),
    ([[1, 2]], 1, "expected a JSON object"),
    ([{"other": 1}], 1, "expected an object"),
])
def test_errors_name_the_line(tmp_path, lines, line, fragment):
    with pytest.raises(DataError) as caught:
        inspect_text_dataset(_write(tmp_path, lines))
    assert caught.value.line == line
    assert f"line {line}" in caught.value.message and fragment in caught.value.message, caught.value.message


def test_empty_file_and_max_rows(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        inspect_text_dataset(_write(tmp_path, ["", "  "]))
    with pytest.raises(DataError) as caught:
        inspect_text_dataset(_write(tmp_path, [{"text": "a"}] * 4), max_rows=3)
    assert caught.value.line == 4


def test_text_unpacked_masks(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    a, b = _ids(tokenizer, "the cat sees a dog ."), _ids(tokenizer, "some birds")
    out = tokenize_for_lm("text", [{"text": "the cat sees a dog ."}, {"text": "some birds"}], tokenizer,
                          max_length=32, packing=False)
    assert out["input_ids"].dtype == torch.int64 and out["loss_mask"].dtype == torch.bool
    length = len(a) + 1  # longest row (eos appended), not max_length
    assert out["input_ids"].shape == (2, length)
    assert out["input_ids"][0].tolist() == a + [eos]
    assert out["input_ids"][1].tolist() == b + [eos] + [pad] * (length - len(b) - 1)
    assert out["attention_mask"][1].tolist() == [1] * (len(b) + 1) + [0] * (length - len(b) - 1)
    assert out["loss_mask"][0].tolist() == [False] + [True] * len(a)  # first token is no target, eos is
    assert out["loss_mask"][1].tolist() == [False] + [True] * len(b) + [False] * (length - len(b) - 1)
    truncated = tokenize_for_lm("text", [{"text": "the cat sees a dog ."}], tokenizer, max_length=4, packing=False)
    assert truncated["input_ids"].tolist() == [a[:4]]


def test_text_packing_blocks(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = ["the cat sees a dog .", "some birds", "every robot helps the children ."]
    stream = [t for text in texts for t in _ids(tokenizer, text) + [eos]]
    out = tokenize_for_lm("text", [{"text": t} for t in texts], tokenizer, max_length=5, packing=True)
    n_rows = -(-len(stream) // 5)
    assert out["input_ids"].shape == (n_rows, 5)
    assert out["input_ids"].flatten().tolist()[: len(stream)] == stream
    tail = n_rows * 5 - len(stream)
    assert out["input_ids"].flatten().tolist()[len(stream):] == [pad] * tail
    assert out["attention_mask"].sum().item() == len(stream)
    assert out["loss_mask"][:, 0].tolist() == [False] * n_rows
    assert out["loss_mask"].sum().item() == len(stream) - n_rows  # every real token but each row's first
    assert (out["loss_mask"] <= out["attention_mask"].bool()).all()
    single = tokenize_for_lm("text", [{"text": "some birds"}], tokenizer, max_length=64, packing=True)
    assert single["input_ids"].shape == (1, 3)  # one short block is not padded to max_length


def test_prompt_completion_masks_and_truncation(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt, completion = _ids(tokenizer, "user : the cat"), _ids(tokenizer, "sees a dog .")
    records = [{"prompt": "user : the cat", "completion": "sees a dog ."}, {"prompt": "the", "completion": "cats"}]
    out = tokenize_for_lm("prompt_completion", records, tokenizer, max_length=64, packing=True)  # packing ignored
    assert out["input_ids"].shape == (2, len(prompt) + len(completion) + 1)
    assert out["input_ids"][0].tolist() == prompt + completion + [eos]
    assert out["loss_mask"][0].tolist() == [False] * len(prompt) + [True] * (len(completion) + 1)
    row = out["input_ids"][1].tolist()
    assert row[:3] == _ids(tokenizer, "the cats") + [eos] and set(row[3:]) == {pad}
    assert out["loss_mask"][1].tolist()[:4] == [False, True, True, False]
    cut = tokenize_for_lm("prompt_completion", records[:1], tokenizer, max_length=len(prompt) + 2, packing=False)
    assert cut["input_ids"][0].tolist() == prompt + completion[:2]  # the completion's end is cut, not the prompt
    assert cut["loss_mask"][0].tolist() == [False] * len(prompt) + [True, True]
    with pytest.raises(DataError) as caught:
        tokenize_for_lm("prompt_completion", [{**records[0], "line": 7}], tokenizer, max_length=len(prompt),
                        packing=False)
    assert caught.value.line == 7 and "no room for the completion" in caught.value.message


def test_lm_rejects_bad_arguments(tokenizer):
    with pytest.raises(SpecError):
        tokenize_for_lm("text", [{"text": "a"}], tokenizer, max_length=1, packing=False)
    with pytest.raises(DataError):
        tokenize_for_lm("text_label", [{"text": "a", "label": 0}], tokenizer, max_length=8, packing=False)


def test_classification_tensors(tokenizer):
    records = [{"text": "the cat", "label": 1}, {"text": "every small robot helps", "label": 0}]
    out = tokenize_for_classification(records, tokenizer, max_length=3)
    assert out["labels"].tolist() == [1, 0] and out["labels"].dtype == torch.int64
    assert out["input_ids"].tolist() == [_ids(tokenizer, "the cat") + [tokenizer.pad_token_id],
                                         _ids(tokenizer, "every small robot")]
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_bos_added_when_the_tokenizer_adds_one():
    """A Llama-style tokenizer that starts sequences with bos gets it at the start of each document / prompt."""
    from tokenizers.processors import TemplateProcessing

    tok = make_word_tokenizer(["<s>", *SYNTHETIC_WORDS])
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.bos_token = "<s>"
    assert tok("the cat")["input_ids"][0] == bos
    out = tokenize_for_lm("text", [{"text": "the cat"}], tok, max_length=8, packing=False)
    assert out["input_ids"][0].tolist() == [bos, *_ids(tok, "the cat"), tok.eos_token_id]
    pc = tokenize_for_lm("prompt_completion", [{"prompt": "the", "completion": "cat"}], tok, max_length=8,
                         packing=False)
    assert pc["input_ids"][0].tolist() == [bos, *_ids(tok, "the cat"), tok.eos_token_id]
    assert pc["loss_mask"][0].tolist() == [False, False, True, True]


@pytest.mark.parametrize("hostile, fragment", [
    ('{"text": "b", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64 levels"),
    ('{"text": "b", "label": ' + "1" * 5000 + "}", "more than 4300 digits"),
    ('{"text": "b", "label": ' + "9" * 4000 + "}", "must be in"),
])
def test_hostile_json_lines_name_the_line(tmp_path, hostile, fragment):
    """Once a RecursionError / bare ValueError (a 500 on upload); now a DataError naming the line."""
    with pytest.raises(DataError) as caught:
        inspect_text_dataset(_write(tmp_path, [{"text": "a", "label": 0}, hostile]))
    assert caught.value.line == 2 and "line 2: " in caught.value.message and fragment in caught.value.message
    assert len(caught.value.message) < 300
