"""JSON from users, parsed so that hostile input is an error with a reason, never a crash.

``json.loads`` recurses once per nesting level (a line of 100,000 ``[`` is a RecursionError)
and refuses integers longer than ``sys.get_int_max_str_digits()`` (4300) with a bare
ValueError. :func:`loads` checks the nesting depth first, in one pass without recursion,
and turns both into :class:`JSONLimitError`; syntax errors stay ``json.JSONDecodeError``.
Both are ValueErrors, so ``except ValueError`` catches every refusal.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import numpy as np

__all__ = ["MAX_DEPTH", "JSONLimitError", "loads", "nesting_depth"]

MAX_DEPTH = 64
"""Deepest nesting of arrays/objects accepted. Datasets need 2 (a line's object and its
features list); model configs 4 or 5."""

# A JSON string, escapes included (unrolled so the regex engine never backtracks per character).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JSONLimitError(ValueError):
    """Well-formed JSON beyond what is parsed here: too deeply nested, or an integer too long.
    ``str(error)`` is a phrase that reads after "line 3: " or "config.json: "."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text``, brackets inside strings ignored.

    Cost: two C-level ``count`` calls when there are few brackets; otherwise two regex passes
    and a cumulative sum over the brackets (numpy), linear in the text, no recursion."""
    openers = text.count("[") + text.count("{")
    if openers <= 1:
        return openers
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with a nesting limit checked before parsing and long integers refused.

    Raises ``json.JSONDecodeError`` for invalid JSON and :class:`JSONLimitError` for JSON
    nested deeper than ``max_depth`` or holding an integer over the int-conversion limit."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")  # UnicodeDecodeError is a ValueError too
    if text.count("[") + text.count("{") > max_depth and nesting_depth(text) > max_depth:
        raise JSONLimitError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:  # belt and braces: the depth check above should make this unreachable
        raise JSONLimitError(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        if "digits" not in str(exc):
            raise
        raise JSONLimitError(f"a number with more than {sys.get_int_max_str_digits()} digits") from None
