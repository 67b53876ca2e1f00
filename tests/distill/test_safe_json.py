"""distill.safe_json: the JSON every user file goes through (JSONL lines, model configs, model-file metadata)."""

from __future__ import annotations

import json
import sys

import pytest

from distill.safe_json import MAX_DEPTH, JSONLimitError, loads, nesting_depth


@pytest.mark.parametrize("text, depth", [
    ("1", 0), ('"[[["', 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('["\\"[", [[]]]', 3),
    ('[[1], [2], [3], [4]]', 2), ('{"a": "}}}}", "b": [[[[]]]]}', 5),
])
def test_nesting_depth_ignores_brackets_in_strings(text, depth):
    assert nesting_depth(text) == depth
    assert loads(text) == json.loads(text)


def test_depth_limit_is_checked_without_recursion():
    assert loads("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    for deep in ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "[" * 1_000_000 + "]" * 1_000_000,
                 "[" * 1_000_000):  # unbalanced too: refused for depth before the parser sees it
        with pytest.raises(JSONLimitError, match=f"nested deeper than {MAX_DEPTH} levels"):
            loads(deep)
    with pytest.raises(JSONLimitError):
        loads('{"a": ' * 10 + "1" + "}" * 10, max_depth=5)


def test_huge_integers_and_invalid_json():
    digits = sys.get_int_max_str_digits()
    assert loads("1" * digits) == int("1" * digits)
    with pytest.raises(JSONLimitError, match=f"more than {digits} digits"):
        loads("[" + "1" * (digits + 1) + "]")
    assert loads("1" * 5000 + ".0") == float("inf")  # a float is not an int conversion
    with pytest.raises(json.JSONDecodeError):
        loads("{broken")
    with pytest.raises(ValueError):
        loads(b"\xff\xfe")  # not UTF-8: a UnicodeDecodeError, a ValueError like the rest
