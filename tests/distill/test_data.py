import json

import pytest
import torch

from distill.data import TabularDataset, load_dataset, split_dataset
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
