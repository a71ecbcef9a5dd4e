"""A task's data from wherever it lives — builtin, local files, or the Hub — as one normalized DatasetDict.

Sequence tasks come out with ``text`` and ``label`` (classification) or ``score`` (regression); token tasks
with ``tokens`` and ``tags`` (lists of strings). Every result has train / validation / test: a missing
validation or test split is carved from train (10% each, seed 0).

Values are checked before any split is carved, so a bad one is named where the user finds it: by the line of
its local file, else by its 1-based row in the split as loaded.
"""

import csv
import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Dataset, DatasetDict

from ..model.configuration_megamoe import TASK_TYPES
from .builtin import BUILTIN_DATASETS, load_builtin, names_a_local_path
from .text_files import DataError, json_lines, utf8_lines
from .tokenization import label_to_id, word_label_ids

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
_EXTENSIONS = (".csv", ".jsonl", ".json", ".conll", ".txt")
CARVE_FRACTION = 0.1
CARVE_SEED = 0


@dataclass
class _Split:
    """One split as read, and where its rows come from."""

    dataset: Dataset
    where: str
    """The file, or ``<source> [<split>]``."""
    lines: list[int] | None = None
    """For a local file: the line each row starts on."""

    def row(self, index: int) -> str:
        """Row ``index`` (0-based, as loaded) as the user finds it: its line in the file, else its row."""
        return f"line {self.lines[index]}" if self.lines is not None else f"row {index + 1}"


def _read_conll(path: Path) -> _Split:
    """Two-column CoNLL (token and tag, whitespace separated); blank or whitespace-only lines end a sentence."""
    sentences: dict[str, list[list[str]]] = {"tokens": [], "tags": []}
    starts: list[int] = []
    tokens: list[str] = []
    tags: list[str] = []
    for line_no, line in utf8_lines(path):
        fields = line.split()
        if not fields:
            if tokens:
                sentences["tokens"].append(tokens)
                sentences["tags"].append(tags)
            tokens, tags = [], []
            continue
        if len(fields) != 2:
            raise DataError(
                f"{path}:{line_no}: expected 2 columns (token tag), got {len(fields)}: {line.rstrip()!r}"
            )
        if not tokens:
            starts.append(line_no)
        tokens.append(fields[0])
        tags.append(fields[1])
    if tokens:
        sentences["tokens"].append(tokens)
        sentences["tags"].append(tags)
    return _Split(Dataset.from_dict(sentences), str(path), starts)


def _csv_record_lines(path: Path) -> list[int] | None:
    """The line each data record of a CSV file starts on (a quoted field may span lines), without the header
    and the blank or whitespace-only lines the CSV builder skips; None for a file the csv module cannot
    split (a field over its size limit), which the builder may still read."""
    starts, end_of_previous = [], 0
    reader = csv.reader(line for _, line in utf8_lines(path))
    try:
        for record in reader:
            if len(record) > 1 or (record and record[0].strip()):
                starts.append(end_of_previous + 1)
            end_of_previous = reader.line_num
    except csv.Error:
        return None
    return starts[1:]


def _read_file(path: Path, task_type: str) -> _Split:
    suffix = path.suffix.lower()
    if suffix in (".conll", ".txt") or (
        suffix not in (".csv", ".json", ".jsonl") and task_type == "token_classification"
    ):
        return _read_conll(path)
    # A pass of our own first: the builders name neither the line nor the offset of a byte that is not
    # UTF-8, nor the line of a broken JSON line.
    lines: list[int] | None
    if suffix == ".jsonl":
        lines = [number for number, _ in json_lines(path)]
        empty = not lines
    elif suffix == ".csv":
        lines = _csv_record_lines(path)
        empty = lines == []
    else:  # a .json file may be one JSON document over many lines: its rows have no line of their own
        lines, empty = None, not any(line.strip() for _, line in utf8_lines(path))
    if empty:
        raise DataError(f"{path}: no data rows (an empty split)")
    builder = "csv" if suffix == ".csv" else "json"
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # the builders raise many types; all mean "this file does not parse"
        raise DataError(f"{path}: cannot read it as {builder}: {err}") from err
    assert isinstance(loaded, Dataset)
    if lines is not None and len(lines) != len(loaded):  # a CSV dialect the builder reads differently
        lines = None
    return _Split(loaded, str(path), lines)


def _split_files(directory: Path, *, need_train: bool) -> dict[str, Path]:
    found = {}
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            matches = [
                directory / f"{alias}{ext}" for ext in _EXTENSIONS if (directory / f"{alias}{ext}").exists()
            ]
            if matches:
                found[split] = matches[0]
                break
    if need_train and "train" not in found:
        raise DataError(f"{directory}: no train file (train.csv, train.jsonl, train.conll, ...)")
    if not found:
        raise DataError(f"{directory}: no train, validation or test file (test.jsonl, test.csv, ...)")
    return found


def _load_local(path: Path, task_type: str, *, need_train: bool) -> dict[str, _Split]:
    files = _split_files(path, need_train=need_train) if path.is_dir() else {"train": path}
    return {split: _read_file(file, task_type) for split, file in files.items()}


def _with_label_names(dataset: Dataset, column: str) -> Dataset:
    """Hub datasets store labels as ClassLabel ids (or lists of them, for tags); turn them into names."""
    feature = dataset.features[column]
    inner = getattr(feature, "feature", None)  # Sequence / List of ClassLabel
    if isinstance(feature, ClassLabel):
        to_names = feature.int2str
    elif isinstance(inner, ClassLabel):
        to_names = inner.int2str
    else:
        return dataset
    # A new column: mapping into the old one would encode the names straight back into ClassLabel ids.
    named = dataset.map(lambda row: {f"{column}:names": to_names(row[column])}, remove_columns=[column])
    return named.rename_column(f"{column}:names", column)


def _normalize(split: _Split, *, columns: dict[str, str], labels: Sequence[str] | None) -> Dataset:
    """Keep the task's columns under their standard names (``columns``: standard name -> source name), and
    check their values (labels against ``labels``, when the task declares them)."""
    dataset, where = split.dataset, split.where
    for standard, source in columns.items():
        if source not in dataset.column_names:
            raise DataError(
                f"{where}: no column {source!r} (for {standard}); columns: {dataset.column_names}"
            )
    for source in columns.values():
        dataset = _with_label_names(dataset, source)
    dataset = dataset.select_columns(list(columns.values()))
    renames = {source: standard for standard, source in columns.items() if source != standard}
    dataset = dataset.rename_columns(renames) if renames else dataset
    for standard, source in columns.items():
        _check_values(dataset[standard], standard, split, column=source)
    for standard in ("label", "tags"):
        if labels is not None and standard in columns:
            _check_labels(dataset, standard, labels, split, column=columns[standard])
    return dataset


def _check_values(values: list[Any], standard: str, split: _Split, *, column: str) -> None:
    """Every value of a column is what its task needs; the first that is not is named."""
    expected, is_valid = _VALUE_CHECKS[standard]
    for index, value in enumerate(values):
        if not is_valid(value):
            raise DataError(
                f"{split.where}, column {column!r}, {split.row(index)}: {value!r} is not {expected}"
            )


def _check_labels(
    dataset: Dataset, standard: str, labels: Sequence[str], split: _Split, *, column: str
) -> None:
    """Every label (``standard`` "label") or tag ("tags") is one of the task's declared ``labels`` or an id
    into them. Checked here, where rows still have their lines: tokenization comes after the carving of
    validation and test, which shuffles."""
    label_index = {label: i for i, label in enumerate(labels)}
    where = f"{split.where}, column {column!r}"
    if standard == "tags":
        for index, (words, tags) in enumerate(zip(dataset["tokens"], dataset["tags"], strict=True)):
            word_label_ids(words, tags, label_index, where=f"{where}, {split.row(index)}")
    else:
        for index, label in enumerate(dataset["label"]):
            label_to_id(label, label_index, where=f"{where}, {split.row(index)}")


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _is_label(value: Any) -> bool:
    # An empty CSV cell reads as None (text column) or NaN (numeric column).
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _is_list_of(kinds: type | types.UnionType) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, list)
        and all(isinstance(item, kinds) and not isinstance(item, bool) for item in value)
    )


_VALUE_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "text": ("a string", lambda value: isinstance(value, str)),
    "score": ("a number", _is_number),
    "label": ("a label (name or id)", _is_label),
    "tokens": ("a list of words (strings)", _is_list_of(str)),
    "tags": ("a list of tags (names or ids)", _is_list_of(str | int)),
}


def _carve(splits: DatasetDict) -> DatasetDict:
    for split in ("validation", "test"):
        if split not in splits:
            parts = splits["train"].train_test_split(test_size=CARVE_FRACTION, seed=CARVE_SEED)
            splits["train"], splits[split] = parts["train"], parts["test"]
    return DatasetDict({split: splits[split] for split in SPLITS})


def load_task_dataset(
    source: str,
    *,
    task_type: str,
    text_column: str = "text",
    label_column: str = "label",
    tokens_column: str = "tokens",
    tags_column: str = "tags",
    labels: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    carve: bool = True,
) -> DatasetDict:
    """Resolve ``source`` (``builtin:<name>`` or a bare builtin name, a local file/directory, else a Hub
    dataset name through `datasets.load_dataset`) into normalized train / validation / test splits.

    ``labels``: the task's declared label names; a label or tag that is neither one of them nor an id into
    them is a `LabelError` naming its line (local files) or row. ``carve``: for training, a source without a
    validation or test split gets one carved from its train split; without, the splits it has (evaluation)."""
    if task_type not in TASK_TYPES:
        raise DataError(f"unknown task type {task_type!r}; task types: {list(TASK_TYPES)}")
    name, path = source.removeprefix("builtin:"), Path(source).expanduser()
    raw: dict[str, _Split]
    if source.startswith("builtin:") or name in BUILTIN_DATASETS:
        try:
            builtin = load_builtin(name, cache_dir)
        except ValueError as err:  # an unknown name: the message lists the builtin datasets
            raise DataError(str(err)) from None
        raw = _named_splits(source, builtin)
    elif path.exists():
        raw = _load_local(path, task_type, need_train=carve)
    elif names_a_local_path(source):
        raise DataError(f"{source}: no such file or directory")
    else:
        try:
            loaded: Any = datasets.load_dataset(source)
        except OSError as err:  # not on the Hub, or no network
            raise DataError(
                f"{source!r} is not a builtin dataset ({', '.join(sorted(BUILTIN_DATASETS))}), a local file "
                f"or directory, or a Hub dataset that loads: {err}"
            ) from None
        raw = _named_splits(source, {_canonical_split(split): ds for split, ds in loaded.items()})

    if task_type == "token_classification":
        columns = {"tokens": tokens_column, "tags": tags_column}
    elif task_type == "sequence_regression":
        columns = {"text": text_column, "score": label_column}
    else:
        columns = {"text": text_column, "label": label_column}
    normalized = DatasetDict(
        {
            split: _normalize(loaded_split, columns=columns, labels=labels)
            for split, loaded_split in raw.items()
            if split in SPLITS
        }
    )
    if not normalized or (carve and "train" not in normalized):
        raise DataError(
            f"{source}: no {'train' if carve else 'train, validation or test'} split (splits: {sorted(raw)})"
        )
    result = _carve(normalized) if carve else normalized
    for split, dataset in result.items():
        if len(dataset) == 0:
            raise DataError(f"{source}: the {split} split is empty")
    return result


def _named_splits(source: str, splits: Mapping[str, Dataset]) -> dict[str, _Split]:
    """Builtin and Hub splits, whose rows are named by their row in the split."""
    return {split: _Split(dataset, f"{source} [{split}]") for split, dataset in splits.items()}


def _canonical_split(split: str) -> str:
    for canonical, aliases in _SPLIT_ALIASES.items():
        if split in aliases:
            return canonical
    return split
