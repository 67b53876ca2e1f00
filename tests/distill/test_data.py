import json
import random

import pytest
import torch

from distill.data import TabularDataset, _read_csv_fast, _read_csv_rows, load_dataset, split_dataset
from distill.errors import DataError


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# --- valid files ------------------------------------------------------------------------------------


def test_csv_without_label(tmp_path):
    ds = load_dataset(_write(tmp_path, "d.csv", "a,b,c\n1,2,3\n4.5,-5,6e-1\n"))
    assert ds.format == "csv"
    assert ds.labels is None
    assert ds.features.dtype == torch.float32
    torch.testing.assert_close(ds.features, torch.tensor([[1, 2, 3], [4.5, -5, 0.6]]))
    assert len(ds) == 2 and ds.num_features == 3
    assert ds.summary()["has_labels"] is False


def test_csv_with_label_in_any_column(tmp_path):
    ds = load_dataset(_write(tmp_path, "d.csv", "a,label,b\n1,0,2\n3,2,4\n5,1,6\n"))
    torch.testing.assert_close(ds.features, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == [0, 2, 1]
    assert ds.summary()["max_label"] == 2


def test_csv_tolerates_bom_crlf_whitespace_and_blank_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffa, label\r\n 1 ,1.0\r\n\r\n2,0\r\n".encode("utf-8"))
    ds = load_dataset(path)
    assert ds.features.flatten().tolist() == [1.0, 2.0]
    assert ds.labels.tolist() == [1, 0]


def test_jsonl_without_label(tmp_path):
    ds = load_dataset(_write(tmp_path, "d.jsonl", _jsonl({"features": [1, 2]}, {"features": [3.5, -4]})))
    assert ds.format == "jsonl" and ds.labels is None
    torch.testing.assert_close(ds.features, torch.tensor([[1.0, 2.0], [3.5, -4.0]]))


def test_jsonl_with_label(tmp_path):
    ds = load_dataset(_write(tmp_path, "d.jsonl", _jsonl({"features": [1, 2], "label": 1}, "",
                                                          {"features": [3, 4], "label": 0})))
    assert ds.labels.tolist() == [1, 0]
    assert ds.features.shape == (2, 2)


def test_format_detected_from_content_without_known_suffix(tmp_path):
    assert load_dataset(_write(tmp_path, "d.data", _jsonl({"features": [1]}))).format == "jsonl"
    assert load_dataset(_write(tmp_path, "e.data", "x\n1\n")).format == "csv"


# --- CSV errors name the line (header = line 1) -------------------------------------------------------


def test_csv_non_numeric_cell(tmp_path):
    path = _write(tmp_path, "d.csv", "alpha,beta\n1,2\n3,4\n5,oops\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    err = info.value
    assert err.line == 4
    assert "line 4" in err.message and "beta" in err.message
    assert err.code == "invalid_dataset"


def test_csv_line_numbers_count_blank_lines(tmp_path):
    path = _write(tmp_path, "d.csv", "alpha,beta\n1,2\n\n3,x\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 4 and "line 4" in info.value.message


@pytest.mark.parametrize("row", ["1,2,3", "1"])
def test_csv_wrong_column_count(tmp_path, row):
    path = _write(tmp_path, "d.csv", f"a,b\n1,2\n{row}\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 3 and "line 3" in info.value.message


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_csv_non_finite_feature(tmp_path, cell):
    path = _write(tmp_path, "d.csv", f"a,b\n1,2\n{cell},3\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 3 and "'a'" in info.value.message


def test_csv_empty_cell(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "a,b\n1,\n"))
    assert info.value.line == 2 and "b" in info.value.message


@pytest.mark.parametrize("label", ["-1", "1.5", "one", ""])
def test_csv_bad_label(tmp_path, label):
    path = _write(tmp_path, "d.csv", f"a,label\n1,0\n2,1\n3,{label}\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 4 and "line 4" in info.value.message


def test_csv_empty_file(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", ""))
    assert "empty" in info.value.message


def test_csv_header_only(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        load_dataset(_write(tmp_path, "d.csv", "a,b\n\n"))


def test_csv_duplicate_column_and_label_only(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "a,a\n1,2\n"))
    assert info.value.line == 1
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "e.csv", "label\n1\n"))
    assert info.value.line == 1


def test_not_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"a,b\n1,\xff\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_dataset(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError):
        load_dataset(tmp_path / "nope.csv")


def test_max_rows(tmp_path):
    path = _write(tmp_path, "d.csv", "a\n1\n2\n3\n")
    assert len(load_dataset(path, max_rows=3)) == 3
    with pytest.raises(DataError) as info:
        load_dataset(path, max_rows=2)
    assert info.value.line == 4


# --- the header line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("first_line", ["1.0,2.0,3.0", "1,2,3", " 1 , -2.5e3 , 0 ", "7", "1,,3", '"1","2","3"'])
def test_csv_numeric_header_is_refused(tmp_path, first_line):
    path = _write(tmp_path, "d.csv", f"{first_line}\n4,5,6\n7,8,9\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 1
    assert "line 1" in info.value.message and "header" in info.value.message
    assert "f0" in info.value.message
    # the row-by-row parser refuses it too (quoted files only ever take that path)
    with pytest.raises(DataError) as info:
        _read_csv_rows(f"{first_line}\n4,5,6\n", None)
    assert info.value.line == 1 and "header" in info.value.message


def test_csv_numeric_header_message_names_the_columns(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "1.0,2.0,3.0\n4,5,6\n"))
    assert "f0,f1,f2" in info.value.message and "label" in info.value.message
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "e.csv", ",".join(["0.5"] * 40) + "\n" + ",".join(["1"] * 40) + "\n"))
    assert "f0,f1,...,f39" in info.value.message


@pytest.mark.parametrize("header", ["1,2,label", "x,0", "label,0,1", "nan_count,1"])
def test_csv_header_mixing_numeric_and_text_names_is_fine(tmp_path, header):
    ds = load_dataset(_write(tmp_path, "d.csv", f"{header}\n1,2{',3' if header.count(',') == 2 else ''}\n"))
    assert len(ds) == 1
    assert ds.num_features == header.count(",") + 1 - ("label" in header)


# --- the vectorized path agrees with the row-by-row parser ----------------------------------------------


def _random_csv(rng: random.Random, rows: int, cols: int, label_at: int | None, crlf: bool = False) -> str:
    names = [f"f{j}" for j in range(cols)]
    if label_at is not None:
        names.insert(label_at, "label")
    spellings = [
        lambda: repr(rng.gauss(0, 1)),  # 17 significant digits: float32 rounding matters
        lambda: f"{rng.uniform(-1e6, 1e6):.3e}",
        lambda: str(rng.randint(-1000, 1000)),
        lambda: f" {rng.uniform(-1, 1):.5f} ",  # whitespace around the cell
        lambda: repr(rng.uniform(-3.4e38, 3.4e38)),  # near the float32 limit, still finite there
        lambda: repr(rng.uniform(-1e-40, 1e-40)),  # float32 subnormals
        lambda: rng.choice(["-0", "0.", ".5", "+1", "1E+2", "-0.0", "1.00000001"]),
    ]
    lines = [",".join(names)]
    for _ in range(rows):
        cells = [rng.choice(spellings)() for _ in range(cols)]
        if label_at is not None:
            cells.insert(label_at, rng.choice([str(rng.randint(0, 9)), f"{rng.randint(0, 9)}.0"]))
        lines.append(",".join(cells))
        if rng.random() < 0.02:
            lines.append("")  # blank lines are skipped
    return ("\r\n" if crlf else "\n").join(lines) + "\n"


@pytest.mark.parametrize("seed,label_at,crlf", [(0, None, False), (1, 0, False), (2, 3, True), (3, 7, False)])
def test_csv_fast_path_equals_row_by_row_parser(tmp_path, seed, label_at, crlf):
    text = _random_csv(random.Random(seed), rows=500, cols=7, label_at=label_at, crlf=crlf)
    assert _read_csv_fast(text, None) is not None  # the case under test takes the vectorized path
    rows, labels = _read_csv_rows(text, None)
    path = tmp_path / "d.csv"
    path.write_bytes(text.encode())
    ds = load_dataset(path)
    assert ds.features.dtype == torch.float32 and ds.features.shape == (500, 7)
    expected = torch.tensor(rows, dtype=torch.float32)
    assert torch.equal(ds.features, expected)  # bit for bit, subnormals and signed zeros aside
    assert torch.equal(torch.signbit(ds.features), torch.signbit(expected))
    if label_at is None:
        assert ds.labels is None and labels is None
    else:
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels


def test_csv_fast_path_features_are_float64_rounded_once(tmp_path):
    # 16777217 = 2**24 + 1 is not a float32: it rounds to even (2**24). 1 + 2**-24 + 1e-30 is just above the
    # float32 midpoint 1 + 2**-24, but float64 rounds it onto that midpoint, and the cast then rounds to
    # even: 1.0 (read straight to float32 it would be 1 + 2**-23). Like float() then torch.float32.
    text = "a,b\n16777217,1.000000059604644775390625000001\n16777219,3.4028235e38\n"
    assert _read_csv_fast(text, None) is not None
    ds = load_dataset(_write(tmp_path, "d.csv", text))
    rows, _ = _read_csv_rows(text, None)
    assert torch.equal(ds.features, torch.tensor(rows, dtype=torch.float32))
    assert ds.features[:, 0].tolist() == [16777216.0, 16777220.0]
    assert ds.features[0, 1].item() == 1.0


# --- errors deep in a large file, and unusual files the fast path leaves to the row-by-row parser ------


def _big_csv(rows=6000, cols=12, label=True):
    rng = random.Random(7)
    header = ",".join([f"f{j}" for j in range(cols)] + (["label"] if label else []))
    lines = [header] + [",".join([f"{rng.gauss(0, 1):.6f}" for _ in range(cols)] + ([str(rng.randint(0, 4))] if label else []))
                        for _ in range(rows)]
    return lines


@pytest.mark.parametrize("cell,expect", [("abc", "not a number"), ("nan", "not a finite number"),
                                         ("-inf", "not a finite number"), ("", "not a number"),
                                         ("1e39", "too large"), ('"x"', "not a number")])
def test_csv_bad_value_deep_in_a_large_file(tmp_path, cell, expect):
    lines = _big_csv()
    cells = lines[4712].split(",")
    cells[7] = cell
    lines[4712] = ",".join(cells)  # file line 4713: the header is line 1
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "\n".join(lines) + "\n"))
    assert info.value.line == 4713
    assert "line 4713" in info.value.message and "column 'f7'" in info.value.message
    assert expect in info.value.message


@pytest.mark.parametrize("label", ["-1", "2.5", "nan", "65536", "x"])
def test_csv_bad_label_deep_in_a_large_file(tmp_path, label):
    lines = _big_csv()
    lines[5999] = lines[5999].rsplit(",", 1)[0] + "," + label
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "\n".join(lines) + "\n"))
    assert info.value.line == 6000 and "line 6000" in info.value.message and "label" in info.value.message


@pytest.mark.parametrize("row", ["1,2,3,4,5,6,7,8,9,10,11", "1,2,3,4,5,6,7,8,9,10,11,12,13,14"])
def test_csv_wrong_column_count_deep_in_a_large_file(tmp_path, row):
    lines = _big_csv(label=False)
    lines[3001] = row
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "\n".join(lines) + "\n"))
    assert info.value.line == 3002 and "line 3002" in info.value.message


def test_csv_every_row_wider_than_the_header(tmp_path):
    # consistent among themselves (numpy alone would accept a 3-column array): still the header decides
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "a,b\n1,2,3\n4,5,6\n"))
    assert info.value.line == 2 and "3 values" in info.value.message


def test_csv_quoted_cells_are_read(tmp_path):
    ds = load_dataset(_write(tmp_path, "d.csv", '"a","label"\n"1.5","2"\n" 3 ",0\n'))
    assert ds.features.flatten().tolist() == [1.5, 3.0] and ds.labels.tolist() == [2, 0]


def test_csv_whitespace_only_and_comma_only_lines_are_blank(tmp_path):
    ds = load_dataset(_write(tmp_path, "d.csv", "a,b\n1,2\n   \n , \n,\n3,4\n  "))
    assert ds.features.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_csv_numbers_python_reads_but_numpy_does_not(tmp_path):
    # float() takes underscores and Unicode digits; whichever path parses, the values are float()'s
    ds = load_dataset(_write(tmp_path, "d.csv", "a,b\n1_000,\u0661\n2,3\n"))
    assert ds.features.tolist() == [[1000.0, 1.0], [2.0, 3.0]]


def test_csv_hash_is_not_a_comment(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "a,b\n1,2\n3,4 # note\n"))
    assert info.value.line == 3 and "'b'" in info.value.message


def test_csv_lone_carriage_return_is_a_data_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"a,b\n1,2\n3,4\r5,6\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 3 and "line 3" in info.value.message


def test_csv_max_rows_does_not_count_blank_lines(tmp_path):
    path = _write(tmp_path, "d.csv", "a\n1\n\n2\n\n3\n\n")
    assert len(load_dataset(path, max_rows=3)) == 3
    with pytest.raises(DataError) as info:
        load_dataset(path, max_rows=2)
    assert info.value.line == 6 and "more than 2 rows" in info.value.message


def test_large_feature_values_beyond_float32_are_refused(tmp_path):
    assert load_dataset(_write(tmp_path, "ok.csv", "a\n3.4e38\n-3.4e38\n")).features.isfinite().all()
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "a,b\n1,2\n3,-1e39\n"))
    assert info.value.line == 3 and "'b'" in info.value.message
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.jsonl", _jsonl({"features": [1, 2]}, {"features": [1e300, 2]})))
    assert info.value.line == 2 and "features[0]" in info.value.message


# --- JSONL errors (line 1 = first line) ---------------------------------------------------------------


def test_jsonl_invalid_json_line(tmp_path):
    path = _write(tmp_path, "d.jsonl", _jsonl({"features": [1]}, "{features: [2]}", {"features": [3]}))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 2 and "line 2" in info.value.message


@pytest.mark.parametrize("first,second", [
    ({"features": [1], "label": 0}, {"features": [2]}),
    ({"features": [1]}, {"features": [2], "label": 1}),
])
def test_jsonl_mixed_labeled_and_unlabeled(tmp_path, first, second):
    path = _write(tmp_path, "d.jsonl", _jsonl(first, {**first, "features": [5]}, second))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 3 and "line 3" in info.value.message


@pytest.mark.parametrize("bad", [
    {"features": [1, "x"]},
    {"features": [1, True]},
    {"features": [1, None]},
    '{"features": [1, NaN]}',
    '{"features": [1, Infinity]}',
    {"features": [1, 2, 3]},  # wrong length
    {"features": []},
    {"features": 3},
    {"values": [1, 2]},
    "[1, 2]",
])
def test_jsonl_bad_features(tmp_path, bad):
    path = _write(tmp_path, "d.jsonl", _jsonl({"features": [0, 0]}, {"features": [1, 1]}, bad))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 3 and "line 3" in info.value.message


@pytest.mark.parametrize("label", [-1, 1.5, "x", True])
def test_jsonl_bad_label(tmp_path, label):
    path = _write(tmp_path, "d.jsonl", _jsonl({"features": [0], "label": 0}, {"features": [1], "label": label}))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 2 and "line 2" in info.value.message


def test_jsonl_empty_file(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        load_dataset(_write(tmp_path, "d.jsonl", "\n\n"))


# --- split_dataset -----------------------------------------------------------------------------------


def _indexed(n, labeled=True) -> TabularDataset:
    features = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    labels = torch.arange(n) % 3 if labeled else None
    return TabularDataset(features, labels, "csv")


@pytest.mark.parametrize("n,fraction,n_val", [(100, 0.2, 20), (10, 0.25, 2), (7, 0.5, 4), (2, 0.9, 1), (5, 0.01, 1)])
def test_split_sizes(n, fraction, n_val):
    train, val = split_dataset(_indexed(n), fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val
    ids = sorted(train.features[:, 0].tolist() + val.features[:, 0].tolist())
    assert ids == list(range(n))  # a partition: nothing lost, nothing duplicated


def test_split_keeps_labels_aligned():
    train, val = split_dataset(_indexed(50), 0.3, seed=4)
    for part in (train, val):
        assert part.labels.tolist() == [int(i) % 3 for i in part.features[:, 0].tolist()]
        assert part.format == "csv"


def test_split_unlabeled_stays_unlabeled():
    train, val = split_dataset(_indexed(10, labeled=False), 0.2, seed=0)
    assert train.labels is None and val.labels is None


def test_split_is_deterministic_by_seed():
    ds = _indexed(200)
    a_train, a_val = split_dataset(ds, 0.2, seed=11)
    b_train, b_val = split_dataset(ds, 0.2, seed=11)
    assert torch.equal(a_val.features, b_val.features) and torch.equal(a_train.features, b_train.features)
    _, c_val = split_dataset(ds, 0.2, seed=12)
    assert not torch.equal(a_val.features, c_val.features)
    # and it is a shuffle, not a head/tail cut
    assert sorted(a_val.features[:, 0].tolist()) != list(range(40))


def test_split_needs_two_rows():
    with pytest.raises(DataError):
        split_dataset(_indexed(1), 0.5, seed=0)


# --- hostile files: limits checked cheaply, errors that name the line -----------------------------------

def _wide_header(columns: int) -> str:
    return ",".join(f"c{i}" for i in range(columns))


def test_csv_header_wider_than_max_columns_is_refused_before_any_row_is_parsed(tmp_path, monkeypatch):
    import distill.data as data

    def never(*args, **kwargs):
        raise AssertionError("the body was parsed")

    monkeypatch.setattr(data, "_read_csv_fast", never)
    monkeypatch.setattr(data, "_read_csv_rows", never)
    path = _write(tmp_path, "wide.csv", _wide_header(70_000) + "\n" + ",".join(["0"] * 70_000) + "\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)  # the default: 65,536 columns, the engine's MAX_FEATURES
    assert info.value.line == 1 and "70000 columns" in info.value.message and "65536" in info.value.message
    with pytest.raises(DataError, match="4 columns; at most 3"):
        load_dataset(_write(tmp_path, "d.csv", "a,b,c,label\n1,2,3,0\n"), max_columns=3)


def test_quoted_csv_header_wider_than_max_columns(tmp_path):
    """Commas inside quotes don't count as columns, so a quoted header is counted by the csv module."""
    assert load_dataset(_write(tmp_path, "ok.csv", '"a,b",c\n1,2\n'), max_columns=2).num_features == 2
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", '"a",b,c\n1,2,3\n'), max_columns=2)
    assert info.value.line == 1 and "3 columns" in info.value.message


def test_jsonl_features_beyond_max_columns(tmp_path):
    path = _write(tmp_path, "d.jsonl", _jsonl({"features": [1, 2]}, {"features": [1, 2, 3, 4]}))
    with pytest.raises(DataError) as info:
        load_dataset(path, max_columns=3)
    assert info.value.line == 2 and "4 features" in info.value.message


@pytest.mark.parametrize("content, line", [
    (b"a" * 140_000 + b",label\n1,0\n", 1),  # the header: once an uncaught csv.Error in the fast path
    (b"a,label\n" + b"1" * 140_000 + b",0\n", 2),
    (b'a,label\n"' + b"1" * 140_000 + b'",0\n', 2),
])
def test_csv_field_over_the_size_limit_names_the_line(tmp_path, content, line):
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == line and "longer than 131072 characters" in info.value.message
    assert len(info.value.message) < 300  # the field is not echoed back


def test_huge_cells_are_not_echoed_in_errors(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(_write(tmp_path, "d.csv", "a,b\n1," + "x" * 100_000 + "\n"))
    assert info.value.line == 2 and "100002 characters" in info.value.message and len(info.value.message) < 300


@pytest.mark.parametrize("line_text, fragment", [
    ('{"features": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64 levels"),
    ('{"features": [1], "meta": ' + "{\"a\": " * 100 + "1" + "}" * 100 + "}", "nested deeper than 64 levels"),
    ('{"features": [' + "1" * 5000 + "]}", "more than 4300 digits"),
    ('{"features": [1], "label": ' + "1" * 5000 + "}", "more than 4300 digits"),
])
def test_jsonl_deep_nesting_and_huge_integers_name_the_line(tmp_path, line_text, fragment):
    path = _write(tmp_path, "d.jsonl", _jsonl({"features": [1]}, line_text))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 2 and "line 2: " in info.value.message and fragment in info.value.message


def test_jsonl_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    path = _write(tmp_path, "d.jsonl", _jsonl({"features": [1, 2], "note": "[" * 500 + "{" * 500}))
    assert load_dataset(path).num_features == 2
