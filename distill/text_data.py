"""Text datasets (JSONL) for language models and text classifiers, and their tokenization.

Every non-blank line is a JSON object of one kind, the same for the whole file:

- ``{"text": str}``                      kind ``text``: language modelling on the whole text;
- ``{"prompt": str, "completion": str}`` kind ``prompt_completion``: the loss is on the
  completion only (the prompt may be empty, the completion may not);
- ``{"text": str, "label": int}``        kind ``text_label``: classification, label >= 0;
- ``{"prompt": str}``                    kind ``prompt``: prompts only (on-policy distillation,
  where the student writes the completions; sequence-level KD, where the teacher does).

Other keys are allowed and ignored, but a line may not mix the kinds' keys (``text`` with
``prompt``, say). Errors are DataError naming the 1-based line (the file is split on
``"\\n"`` only: U+2028 and friends are valid inside JSON strings). Blank lines are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import DataError, ModelFormatError, SpecError
from .data import _shown, parse_json_line, read_text

__all__ = [
    "KINDS",
    "MAX_CLASSES",
    "inspect_text_dataset",
    "load_text_records",
    "tokenize_for_lm",
    "tokenize_for_classification",
]

KINDS = ("text", "prompt_completion", "text_label", "prompt")
DEFAULT_MAX_LENGTH = 256  # tokens per sequence when data.max_length is not given (clamped to the models' context)
MAX_CLASSES = 1 << 16
_KEYS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "text_label": ("text", "label")}


def _read_lines(path: Path) -> list[str]:
    return read_text(path).split("\n")  # "\n" only: U+2028 may sit inside a JSON string


def _kind_of(record: dict, line: int) -> str:
    has_prompt = "prompt" in record or "completion" in record
    if has_prompt and ("text" in record or "label" in record):
        raise DataError(f"line {line}: mixes 'prompt'/'completion' with 'text'/'label'; a line is either "
                        "{\"text\"}, {\"prompt\", \"completion\"} or {\"text\", \"label\"}", line=line)
    if has_prompt:
        return "prompt_completion" if "completion" in record else "prompt"
    if "label" in record:
        return "text_label"
    if "text" in record:
        return "text"
    raise DataError(f"line {line}: expected an object with \"text\", \"prompt\" and \"completion\", or \"text\" and "
                    "\"label\"", line=line)


def _string(record: dict, key: str, line: int, allow_empty: bool = False) -> str:
    if key not in record:
        raise DataError(f"line {line}: '{key}' is missing", line=line)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"line {line}: '{key}' must be a string, got {type(value).__name__}", line=line)
    if not allow_empty and not value.strip():
        raise DataError(f"line {line}: '{key}' is empty", line=line)
    return value


def _label(record: dict, line: int) -> int:
    value = record["label"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"line {line}: label {_shown(value)} must be an integer (a class index >= 0)", line=line)
    if not 0 <= value < MAX_CLASSES:
        raise DataError(f"line {line}: label {_shown(value)} must be in [0, {MAX_CLASSES})", line=line)
    return value


def _parse(path: str | Path, max_rows: int | None) -> tuple[str, list[dict]]:
    path = Path(path)
    kind: str | None = None
    first_line = 0
    records: list[dict] = []
    for line, raw in enumerate(_read_lines(path), start=1):
        if not raw.strip():
            continue
        record = parse_json_line(raw, line)  # DataError for bad JSON, deep nesting, 4300-digit integers
        if not isinstance(record, dict):
            raise DataError(f"line {line}: expected a JSON object, got {type(record).__name__}", line=line)
        line_kind = _kind_of(record, line)
        if kind is None:
            kind, first_line = line_kind, line
        elif line_kind != kind:
            raise DataError(f"line {line}: a {line_kind} record, but line {first_line} is {kind}; "
                            "every line of a file must be of one kind", line=line)
        if kind == "text":
            clean: dict[str, Any] = {"text": _string(record, "text", line)}
        elif kind == "text_label":
            clean = {"text": _string(record, "text", line), "label": _label(record, line)}
        elif kind == "prompt":
            clean = {"prompt": _string(record, "prompt", line)}
        else:
            clean = {"prompt": _string(record, "prompt", line, allow_empty=True),
                     "completion": _string(record, "completion", line)}
        clean["line"] = line
        records.append(clean)
        if max_rows is not None and len(records) > max_rows:
            raise DataError(f"the file has more than {max_rows} rows", line=line)
    if kind is None:
        raise DataError("the file has no data rows")
    return kind, records


def inspect_text_dataset(path: str | Path, max_rows: int | None = None) -> dict:
    """Check a JSONL text dataset. Returns ``{"format": "jsonl", "kind", "rows", "characters"}``
    plus ``"num_labels"`` (max label + 1) for text_label. Raises DataError naming the line."""
    kind, records = _parse(path, max_rows)
    fields = {"prompt_completion": ("prompt", "completion"), "prompt": ("prompt",)}.get(kind, ("text",))
    summary = {"format": "jsonl", "kind": kind, "rows": len(records),
               "characters": sum(len(r[f]) for r in records for f in fields)}
    if kind == "text_label":
        summary["num_labels"] = max(r["label"] for r in records) + 1
    return summary


def load_text_records(path: str | Path, max_rows: int | None = None) -> tuple[str, list[dict]]:
    """``(kind, records)``: each record has its kind's keys (``text`` / ``prompt``+``completion`` /
    ``text``+``label``) and ``line``, the 1-based line it came from; other keys are dropped."""
    return _parse(path, max_rows)


# --------------------------------------------------------------------------- tokenization

def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise SpecError(f"max_length must be an integer >= 2, got {max_length!r}", param="data.max_length")


def _special_ids(tokenizer) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelFormatError("the tokenizer has no end-of-sequence (eos) token; a causal LM dataset needs one")
    pad = tokenizer.pad_token_id
    return eos, (pad if pad is not None else eos)


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` if the tokenizer itself starts sequences with bos (Llama, Gemma), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if len(with_special) > len(without) and with_special[0] == bos else []


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _stack(rows: list[tuple[list[int], list[bool]]], pad: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    n = len(rows)
    input_ids = torch.full((n, length), pad, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    loss_mask = torch.zeros((n, length), dtype=torch.bool)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    loss_mask[:, 0] = False  # nothing predicts a row's first token
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def tokenize_for_lm(kind: str, records: list[dict], tokenizer, max_length: int, packing: bool) -> dict[str, torch.Tensor]:
    """Token tensors for causal-LM training: ``input_ids`` (N, L) int64, ``attention_mask``
    (N, L) int64 and ``loss_mask`` (N, L) bool, True where the token is a training *target*
    (the logits at t predict token t+1, so the loss of target t+1 uses ``loss_mask[:, t+1]``;
    ``loss_mask[:, 0]`` is always False). Rows are right-padded with the pad token (eos if
    none); L is the longest row, at most ``max_length``.

    - ``text``: each document is its tokens + eos (with bos first when the tokenizer adds one).
      ``packing=True`` concatenates the documents into one stream cut into rows of
      ``max_length`` (only the last row is padded); every token but a row's first is a target,
      including a document's first token after the previous document's eos, and attention is
      not blocked between documents in a row. ``packing=False``: one document per row,
      truncated to ``max_length``, every real token but the first a target.
    - ``prompt_completion``: prompt tokens (bos first if the tokenizer adds one) then
      completion tokens + eos, one pair per row; targets are the completion tokens and the
      eos (no eos for a record marked ``"truncated": true``, e.g. a generation cut off by
      max_new_tokens: the model must not learn to stop there). Too long rows lose the end of the completion; a prompt that leaves no room for one
      completion token is a DataError naming the record's line. ``packing`` is ignored
      (packing would make prompts of one pair attend to another's completion).
    """
    _check_max_length(max_length)
    if kind not in ("text", "prompt_completion"):
        raise DataError(f"a causal LM needs text or prompt_completion data, not {kind}")
    if not records:
        raise DataError("the dataset has no records")
    eos, pad = _special_ids(tokenizer)
    prefix = _bos_prefix(tokenizer)
    rows: list[tuple[list[int], list[bool]]] = []
    if kind == "text":
        documents = [prefix + ids + [eos] for ids in _encode(tokenizer, [r["text"] for r in records])]
        if packing:
            stream = [token for document in documents for token in document]
            for start in range(0, len(stream), max_length):
                block = stream[start:start + max_length]
                rows.append((block, [True] * len(block)))
        else:
            for document in documents:
                document = document[:max_length]
                rows.append((document, [True] * len(document)))
    else:
        prompts = _encode(tokenizer, [r["prompt"] for r in records])
        completions = _encode(tokenizer, [r["completion"] for r in records])
        for index, (record, prompt, completion) in enumerate(zip(records, prompts, completions)):
            prompt = prefix + prompt
            target = completion + ([] if record.get("truncated") is True else [eos])
            room = max_length - len(prompt)
            if room < 1:
                line = record.get("line")
                where = f"line {line}" if line is not None else f"record {index + 1}"
                raise DataError(f"{where}: the prompt is {len(prompt)} tokens long, which leaves no room for the "
                                f"completion within max_length {max_length}; shorten the prompt or raise max_length",
                                line=line)
            target = target[:room]
            rows.append((prompt + target, [False] * len(prompt) + [True] * len(target)))
    return _stack(rows, pad)


def tokenize_for_classification(records: list[dict], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (N, L) int64 (the tokenizer's own special tokens,
    e.g. BERT's [CLS]/[SEP], truncated to ``max_length``, right-padded to the longest row) and
    ``labels`` (N,) int64, from text_label records."""
    _check_max_length(max_length)
    if not records:
        raise DataError("the dataset has no records")
    missing = next((r for r in records if "label" not in r), None)
    if missing is not None:
        raise DataError("classification needs text_label records ({\"text\", \"label\"})", line=missing.get("line"))
    if tokenizer.pad_token_id is None:
        raise ModelFormatError("the tokenizer has no pad token; load it with distill.hf.load_tokenizer")
    encoded = tokenizer([r["text"] for r in records], add_special_tokens=True, truncation=True,
                        max_length=max_length, padding="longest", return_tensors="pt")
    return {"input_ids": encoded["input_ids"].to(torch.long),
            "attention_mask": encoded["attention_mask"].to(torch.long),
            "labels": torch.tensor([r["label"] for r in records], dtype=torch.long)}
