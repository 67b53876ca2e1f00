"""Tabular datasets: CSV or JSONL files in, float32 feature tensors out.

- CSV: a header row; every column numeric; an optional integer column ``label``.
- JSONL: one object a line, ``{"features": [...], "label": k}`` (label optional).

Labels are all-or-nothing within a file. Errors name the 1-based line (the CSV
header is line 1) and, where there is one, the column.

Hostile files are refused cheaply, before the body is parsed where possible: a header
wider than ``max_columns`` (counted on the first line's text), a field longer than the
csv module's limit (131,072 characters), JSON nested deeper than
:data:`distill.safe_json.MAX_DEPTH` or holding an integer of more than 4300 digits.

CSV bodies are parsed vectorized (numpy) when the file is plain; any file that path
declines (an error, quotes, odd blank lines) goes through the row-by-row parser,
which is the reference for both values and error messages.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import safe_json
from .errors import DataError

__all__ = ["TabularDataset", "load_dataset", "split_dataset", "parse_json_line", "LABEL_COLUMN", "MAX_COLUMNS"]

LABEL_COLUMN = "label"
MAX_FEATURES = 1 << 16
MAX_COLUMNS = MAX_FEATURES  # columns of a CSV header, label included (DISTILL_MAX_DATASET_COLUMNS)
MAX_CLASSES = 1 << 16
SHOWN_CHARS = 40  # a cell quoted in an error message is cut to this many characters


@dataclass
class TabularDataset:
    features: torch.Tensor  # (N, D) float32
    labels: torch.Tensor | None  # (N,) int64, or None for an unlabeled transfer set
    format: str  # "csv" | "jsonl"

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    def summary(self) -> dict:
        summary = {"format": self.format, "rows": len(self), "num_features": self.num_features,
                   "has_labels": self.labels is not None}
        if self.labels is not None:
            summary["max_label"] = int(self.labels.max())
        return summary


# The smallest magnitude that float32 rounds to infinity: 2**128 - 2**103 (FLT_MAX plus half an ulp,
# the tie rounding to even, i.e. up). A finite float64 at or beyond it would become inf in the features.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


def _shown(value: object) -> str:
    """``repr(value)`` cut to about SHOWN_CHARS characters: a 100,000-character cell is not echoed back."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _number(cell: str, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise DataError(f"line {line}, column {_shown(column)}: {_shown(cell)} is not a number", line=line) from None
    if not math.isfinite(value):
        raise DataError(f"line {line}, column {_shown(column)}: {_shown(cell)} is not a finite number", line=line)
    if abs(value) >= FLOAT32_OVERFLOW:
        raise DataError(f"line {line}, column {_shown(column)}: {_shown(cell)} is too large for a float32 feature",
                        line=line)
    return value


def _label(value: object, line: int) -> int:
    """A class index: an integer in [0, MAX_CLASSES) (a CSV cell may spell it "3" or "3.0")."""
    raw = value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataError(f"line {line}: label {_shown(raw)} is not an integer", line=line) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < MAX_CLASSES \
            or value != int(value):
        raise DataError(f"line {line}: label {_shown(raw)} must be an integer in [0, {MAX_CLASSES})", line=line)
    return int(value)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _check_width(text: str, max_columns: int) -> None:
    """Refuse a header wider than ``max_columns`` from the first line's text, before any cell is parsed:
    a 10^6-column file would otherwise cost gigabytes of Python objects before the width check.
    Commas inside quotes make the count an upper bound, so a quoted header is left to ``_csv_header``."""
    end = text.find("\n")
    first = text if end < 0 else text[:end]
    if '"' not in first and first.count(",") + 1 > max_columns:
        raise DataError(f"line 1: the header has {first.count(',') + 1} columns; at most {max_columns} are "
                        "allowed", line=1)


def _csv_header(cells: list[str] | None,
                max_columns: int = MAX_COLUMNS) -> tuple[list[str], int | None, list[tuple[int, str]]]:
    """Check the header row (line 1): (column names, index of ``label`` or None, [(index, name)] of features)."""
    if not cells or not any(h.strip() for h in cells):
        raise DataError("the CSV file is empty; it needs a header row", line=1)
    if len(cells) > max_columns:
        raise DataError(f"line 1: the header has {len(cells)} columns; at most {max_columns} are allowed", line=1)
    header = [h.strip() for h in cells]
    if all(not h or _is_number(h) for h in header):
        example = ",".join(f"f{i}" for i in range(len(header))) if len(header) <= 4 \
            else f"f0,f1,...,f{len(header) - 1}"
        raise DataError(
            "line 1: the first line looks like data (all numbers); a CSV needs a header line naming the "
            f"columns, e.g. {example} (with the class column, if any, named '{LABEL_COLUMN}')",
            line=1,
        )
    if len(set(header)) != len(header):
        duplicate = next(h for h in header if header.count(h) > 1)
        raise DataError(f"line 1: column {_shown(duplicate)} appears twice", line=1)
    label_index = header.index(LABEL_COLUMN) if LABEL_COLUMN in header else None
    feature_columns = [(i, h) for i, h in enumerate(header) if i != label_index]
    if not feature_columns:
        raise DataError("line 1: the header has no feature columns", line=1)
    return header, label_index, feature_columns


def _read_csv_rows(text: str, max_rows: int | None,
                   max_columns: int = MAX_COLUMNS) -> tuple[list[list[float]], list[int] | None]:
    """The reference CSV parser: row by row with the csv module; every error names its line (and column).

    Slow (a Python float per cell); ``_read_csv`` tries ``_read_csv_fast`` first and comes here only
    when that declines, so this one decides every error and every unusual file (quotes, odd blank lines).
    """
    reader = csv.reader(io.StringIO(text))
    try:
        return _csv_rows(reader, max_rows, max_columns)
    except csv.Error as exc:  # a lone CR inside a line, a field over the csv module's size limit
        line = max(1, reader.line_num)
        if "new-line character" in str(exc):
            reason = "a carriage return (CR) inside a line; save the file with LF or CRLF line endings"
        elif "field limit" in str(exc):
            reason = f"a field is longer than {csv.field_size_limit()} characters"
        else:
            reason = str(exc)
        raise DataError(f"line {line}: not valid CSV: {reason}", line=line) from None


def _csv_rows(reader, max_rows: int | None,
              max_columns: int = MAX_COLUMNS) -> tuple[list[list[float]], list[int] | None]:
    header, label_index, feature_columns = _csv_header(next(reader, None), max_columns)
    rows: list[list[float]] = []
    labels: list[int] | None = [] if label_index is not None else None
    for line_index, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines carry nothing
        if len(row) != len(header):
            raise DataError(f"line {line_index}: {len(row)} values, the header has {len(header)} columns", line=line_index)
        rows.append([_number(row[i], line_index, name) for i, name in feature_columns])
        if labels is not None:
            labels.append(_label(row[label_index].strip(), line_index))
        if max_rows is not None and len(rows) > max_rows:
            raise DataError(f"the file has more than {max_rows} rows", line=line_index)
    return rows, labels


def _read_csv_fast(text: str, max_rows: int | None,
                   max_columns: int = MAX_COLUMNS) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Vectorized CSV parsing: (features (N, D) float32, labels (N,) int64 or None), or None to decline.

    The header goes through the csv module and ``_csv_header`` (so its errors are the reference ones); the
    body through ``numpy.loadtxt`` as float64 (the same correctly rounded conversion as ``float()``), cast
    to float32. Anything unusual (quotes, lone CRs, an unparsable or non-finite cell, a wrong column count,
    a bad label, too many rows, no rows) declines, and the row-by-row parser then names the line at fault.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        if "\r" in text:
            return None  # a lone CR ends a line for the csv module, not here
    lines = text.split("\n")  # one str per line: no Python objects per cell
    if '"' in lines[0]:
        return None  # a quoted header may span lines: leave it to the csv module
    try:
        cells = next(csv.reader(lines[:1]), None)
    except csv.Error:
        return None  # e.g. a header field over the csv module's size limit: the reference parser names it
    header, label_index, _ = _csv_header(cells, max_columns)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "input contained no data": decline
            # ... but blank lines not counting towards max_rows is what we want (numpy >= 1.23 says so once)
            warnings.filterwarnings("ignore", message=r"Input line \d+ contained no data", category=UserWarning)
            data = np.loadtxt(lines[1:], delimiter=",", dtype=np.float64, ndmin=2, comments=None,
                              quotechar=None, max_rows=None if max_rows is None else max_rows + 1)
    except Exception:  # noqa: BLE001 - whatever numpy refuses, the reference parser judges
        return None
    n, width = data.shape
    if n == 0 or width != len(header) or (max_rows is not None and n > max_rows):
        return None
    if label_index is None:
        labels = None
        with np.errstate(over="ignore", invalid="ignore"):
            features = data.astype(np.float32)
    else:
        column = data[:, label_index]
        if not np.all((column >= 0) & (column < MAX_CLASSES) & (column == np.floor(column))):  # NaN fails too
            return None
        labels = column.astype(np.int64)
        features = np.empty((n, width - 1), dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # float64 -> float32, column blocks either side
            features[:, :label_index] = data[:, :label_index]
            features[:, label_index:] = data[:, label_index + 1:]
    if not np.isfinite(features).all():  # NaN, inf, or beyond the float32 range: let the slow path name it
        return None
    return features, labels


def _read_csv(text: str, max_rows: int | None,
              max_columns: int = MAX_COLUMNS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CSV text as (features (N, D) float32, labels (N,) int64 or None): fast path, else the row-by-row one."""
    _check_width(text, max_columns)
    fast = _read_csv_fast(text, max_rows, max_columns)
    if fast is not None:
        features, labels = fast
        return torch.from_numpy(features), (torch.from_numpy(labels) if labels is not None else None)
    rows, labels = _read_csv_rows(text, max_rows, max_columns)
    return _tensors(rows, labels)


def _tensors(rows: list[list[float]], labels: list[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not rows:
        raise DataError("the file has no data rows")
    features = torch.tensor(rows, dtype=torch.float32)
    return features, (torch.tensor(labels, dtype=torch.int64) if labels is not None else None)


def _finite(value: object) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN, inf and ints beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse_json_line(raw: str, line: int) -> object:
    """One JSONL line parsed, or DataError naming the line: invalid JSON, nesting deeper than
    :data:`distill.safe_json.MAX_DEPTH`, or an integer of more than 4300 digits."""
    try:
        return safe_json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"line {line}: not valid JSON ({exc.msg})", line=line) from None
    except safe_json.JSONLimitError as exc:
        raise DataError(f"line {line}: {exc}", line=line) from None


def _read_jsonl(text: str, max_rows: int | None,
                max_columns: int = MAX_COLUMNS) -> tuple[list[list[float]], list[int] | None]:
    rows: list[list[float]] = []
    labels: list[int] = []
    labeled: bool | None = None
    # Split on "\n" only: str.splitlines() also splits on U+2028 etc., which JSON allows inside strings.
    for line_index, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        record = parse_json_line(raw, line_index)
        if not isinstance(record, dict) or "features" not in record:
            raise DataError(f"line {line_index}: expected an object with a 'features' list", line=line_index)
        features = record["features"]
        if not isinstance(features, list) or not features:
            raise DataError(f"line {line_index}: 'features' must be a non-empty list of numbers", line=line_index)
        if len(features) > max_columns:
            raise DataError(f"line {line_index}: {len(features)} features; at most {max_columns} columns are allowed",
                            line=line_index)
        if rows and len(features) != len(rows[0]):
            raise DataError(
                f"line {line_index}: {len(features)} features, earlier lines have {len(rows[0])}", line=line_index
            )
        row = []
        for j, value in enumerate(features):
            number = _finite(value)
            if number is None:
                raise DataError(f"line {line_index}: features[{j}] = {_shown(value)} is not a finite number",
                                line=line_index)
            if abs(number) >= FLOAT32_OVERFLOW:
                raise DataError(f"line {line_index}: features[{j}] = {_shown(value)} is too large for a float32 "
                                "feature", line=line_index)
            row.append(number)
        has_label = "label" in record and record["label"] is not None
        if labeled is None:
            labeled = has_label
        elif labeled != has_label:
            raise DataError(
                f"line {line_index}: {'has' if has_label else 'lacks'} a label, unlike earlier lines; "
                "label every line or none",
                line=line_index,
            )
        if has_label:
            labels.append(_label(record["label"], line_index))
        rows.append(row)
        if max_rows is not None and len(rows) > max_rows:
            raise DataError(f"the file has more than {max_rows} rows", line=line_index)
    return rows, (labels if labeled else None)


def detect_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def read_text(path: str | Path) -> str:
    """A dataset file as text (UTF-8, a BOM dropped), or DataError."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"the file is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read the dataset file: {exc.strerror}") from None


def load_dataset(path: str | Path, max_rows: int | None = None, format: str | None = None,
                 max_columns: int = MAX_COLUMNS) -> TabularDataset:
    """Parse and check a dataset file. Raises DataError naming the line at fault.

    ``max_columns`` caps the CSV header's columns (label included) and a JSONL line's features;
    the CSV header is checked before any row is parsed."""
    path = Path(path)
    text = read_text(path)
    format = format or detect_format(path, text)
    if format == "jsonl":
        features, label_tensor = _tensors(*_read_jsonl(text, max_rows, max_columns))
    else:
        features, label_tensor = _read_csv(text, max_rows, max_columns)
    if len(features) == 0:
        raise DataError("the file has no data rows")
    if features.shape[1] > MAX_FEATURES:
        raise DataError(f"at most {MAX_FEATURES} features per row")
    return TabularDataset(features=features, labels=label_tensor, format=format)


def split_dataset(dataset: TabularDataset, validation_fraction: float, seed: int) -> tuple[TabularDataset, TabularDataset]:
    """Shuffle with ``seed`` and hold out ``validation_fraction`` of the rows (at least one each side)."""
    n = len(dataset)
    if n < 2:
        raise DataError("a validation split needs at least 2 rows; upload a validation_file instead")
    n_val = min(n - 1, max(1, round(n * validation_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val], order[n_val:]

    def take(idx: torch.Tensor) -> TabularDataset:
        labels = dataset.labels[idx] if dataset.labels is not None else None
        return TabularDataset(dataset.features[idx], labels, dataset.format)

    return take(train_idx), take(val_idx)
