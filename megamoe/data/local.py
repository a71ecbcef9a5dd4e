"""A task's data from wherever it lives — builtin, local files, or the Hub — as one normalized DatasetDict.

Sequence tasks come out with ``text`` and ``label`` (classification) or ``score`` (regression); token tasks
with ``tokens`` and ``tags`` (lists of strings). Every result has train / validation / test: a missing
validation or test split is carved from train (10% each, seed 0).
"""

import math
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Dataset, DatasetDict

from ..model.configuration_megamoe import TASK_TYPES
from .builtin import BUILTIN_DATASETS, load_builtin, names_a_local_path

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
_EXTENSIONS = (".csv", ".jsonl", ".json", ".conll", ".txt")
CARVE_FRACTION = 0.1
CARVE_SEED = 0


class DataError(ValueError):
    """Data that cannot be used as given, with the file and line or the column that is wrong."""


def read_conll(path: Path) -> Dataset:
    """Two-column CoNLL (token and tag, whitespace separated); blank or whitespace-only lines end a sentence."""
    sentences: dict[str, list[list[str]]] = {"tokens": [], "tags": []}
    tokens: list[str] = []
    tags: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
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
            tokens.append(fields[0])
            tags.append(fields[1])
    if tokens:
        sentences["tokens"].append(tokens)
        sentences["tags"].append(tags)
    return Dataset.from_dict(sentences)


def _read_file(path: Path, task_type: str) -> Dataset:
    suffix = path.suffix.lower()
    if suffix in (".conll", ".txt") or (
        suffix not in (".csv", ".json", ".jsonl") and task_type == "token_classification"
    ):
        return read_conll(path)
    builder = "csv" if suffix == ".csv" else "json"
    header_lines = 1 if builder == "csv" else 0
    with path.open(encoding="utf-8") as lines:
        if sum(1 for line in lines if line.strip()) <= header_lines:
            raise DataError(f"{path}: no data rows (an empty split)")
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # the builders raise many types; all mean "this file does not parse"
        raise DataError(f"{path}: cannot read it as {builder}: {err}") from err
    assert isinstance(loaded, Dataset)
    return loaded


def _split_files(directory: Path) -> dict[str, Path]:
    found = {}
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            matches = [
                directory / f"{alias}{ext}" for ext in _EXTENSIONS if (directory / f"{alias}{ext}").exists()
            ]
            if matches:
                found[split] = matches[0]
                break
    if "train" not in found:
        raise DataError(f"{directory}: no train file (train.csv, train.jsonl, train.conll, ...)")
    return found


def _load_local(path: Path, task_type: str) -> DatasetDict:
    files = _split_files(path) if path.is_dir() else {"train": path}
    return DatasetDict({split: _read_file(file, task_type) for split, file in files.items()})


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


def _normalize(dataset: Dataset, *, task_type: str, columns: dict[str, str], where: str) -> Dataset:
    """Keep the task's columns under their standard names (``columns``: standard name -> source name)."""
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
        _check_values(dataset[standard], standard, where=f"{where}, column {source!r}")
    return dataset


def _check_values(values: list[Any], standard: str, *, where: str) -> None:
    """Every value of a column is what its task needs; the first that is not is named (row 1-based, as loaded)."""
    expected, is_valid = _VALUE_CHECKS[standard]
    for row, value in enumerate(values, start=1):
        if not is_valid(value):
            raise DataError(f"{where}, row {row}: {value!r} is not {expected}")


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
    cache_dir: str | Path | None = None,
) -> DatasetDict:
    """Resolve ``source`` (``builtin:<name>`` or a bare builtin name, a local file/directory, else a Hub
    dataset name through `datasets.load_dataset`) into normalized train / validation / test splits."""
    if task_type not in TASK_TYPES:
        raise DataError(f"unknown task type {task_type!r}; task types: {list(TASK_TYPES)}")
    name, path = source.removeprefix("builtin:"), Path(source).expanduser()
    if source.startswith("builtin:") or name in BUILTIN_DATASETS:
        try:
            raw = load_builtin(name, cache_dir)
        except ValueError as err:  # an unknown name: the message lists the builtin datasets
            raise DataError(str(err)) from None
    elif path.exists():
        raw = _load_local(path, task_type)
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
        raw = DatasetDict({_canonical_split(split): ds for split, ds in loaded.items()})

    if task_type == "token_classification":
        columns = {"tokens": tokens_column, "tags": tags_column}
    elif task_type == "sequence_regression":
        columns = {"text": text_column, "score": label_column}
    else:
        columns = {"text": text_column, "label": label_column}
    normalized = DatasetDict(
        {
            split: _normalize(ds, task_type=task_type, columns=columns, where=f"{source} [{split}]")
            for split, ds in raw.items()
            if split in SPLITS
        }
    )
    if "train" not in normalized:
        raise DataError(f"{source}: no train split (splits: {sorted(raw)})")
    result = _carve(normalized)
    for split, dataset in result.items():
        if len(dataset) == 0:
            raise DataError(f"{source}: the {split} split is empty")
    return result


def _canonical_split(split: str) -> str:
    for canonical, aliases in _SPLIT_ALIASES.items():
        if split in aliases:
            return canonical
    return split
