"""Tokenization for the task types, NER word → sub-token label alignment and its inverse.

Sequence tasks read the ``text`` column (and ``label`` / ``score``); token tasks read ``tokens`` (words)
and ``tags`` (one tag per word). Labels become ids through the task's label list; a label that is not in
it is an error naming the task, the row and the label, never a silent skip.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

IGNORE_INDEX = -100


class LabelError(ValueError):
    """A label in the data that the task's label list does not know, or an id out of range."""


def load_tokenizer(source: str | Path, *, pretokenized: bool) -> PreTrainedTokenizerBase:
    """The training tokenizer of ``source``; ``pretokenized``: some task gives words, not text (NER).

    Byte-level BPE (GPT-2, RoBERTa, BART, Qwen) marks a word start with the space before it (``ĠParis``); words
    passed one by one have none, so without ``add_prefix_space`` every word after the first is cut into the
    pieces of a word's middle (``Par`` ``is``) that pretraining rarely saw, and transformers does not warn.
    HF's run_ner.py loads such tokenizers with ``add_prefix_space=True``; so does this, and the setting is saved
    with the model, so `megamoe predict` splits words the same way.
    """
    tokenizer = AutoTokenizer.from_pretrained(source)
    if pretokenized and _byte_level_without_prefix_space(tokenizer):
        tokenizer = AutoTokenizer.from_pretrained(source, add_prefix_space=True)
    if tokenizer.pad_token is None:  # causal LMs (Mixtral, ...) ship none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _byte_level_without_prefix_space(tokenizer: PreTrainedTokenizerBase) -> bool:
    if not tokenizer.is_fast:
        return False
    pending = [json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")]
    while pending:  # the pre-tokenizer, or a Sequence of them (Qwen: Split, then ByteLevel)
        step = pending.pop()
        if isinstance(step, dict):
            if step.get("type") == "ByteLevel" and not step.get("add_prefix_space"):
                return True
            pending.extend(step.get("pretokenizers", []))
    return False


def label_to_id(label: Any, label_index: dict[str, int], *, where: str) -> int:
    """A label name (or an already-numeric id) as an id of the task's label list."""
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(label_index):
            raise LabelError(f"{where}: label id {label} is out of range [0, {len(label_index)})")
        return label
    if label not in label_index:
        raise LabelError(f"{where}: unknown label {label!r}; known labels: {list(label_index)}")
    return label_index[label]


def word_label_ids(
    words: Sequence[str], tags: Sequence[Any], label_index: dict[str, int], *, where: str
) -> list[int]:
    """The label id of each word from its tag; a tag count that is not the word count, or a tag the task does
    not know, is a `LabelError` naming the word (1-based)."""
    if len(words) != len(tags):
        raise LabelError(f"{where}: {len(words)} words but {len(tags)} tags")
    return [
        label_to_id(tag, label_index, where=f"{where}, word {j} ({word!r})")
        for j, (word, tag) in enumerate(zip(words, tags, strict=True), start=1)
    ]


def begin_to_inside(label_list: Sequence[str]) -> list[int]:
    """For each label id, the id a word's continuation sub-tokens get: ``B-X`` → ``I-X`` (itself otherwise)."""
    index = {label: i for i, label in enumerate(label_list)}
    return [
        index.get("I-" + label[2:], i) if label.startswith("B-") else i for i, label in enumerate(label_list)
    ]


def align_word_labels(
    word_ids: Sequence[int | None],
    word_label_ids: Sequence[int],
    *,
    label_all_subtokens: bool = False,
    continuation_ids: Sequence[int] | None = None,
) -> list[int]:
    """Sub-token labels from word labels.

    The first sub-token of each word carries the word's label; special tokens get -100, and so do the
    other sub-tokens unless ``label_all_subtokens`` (then they get the word's label, with ``B-X`` turned
    into ``I-X`` through ``continuation_ids`` so the IOB2 sequence stays valid).
    """
    labels = []
    previous = None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous:
            labels.append(word_label_ids[word])
        elif label_all_subtokens:
            label = word_label_ids[word]
            labels.append(continuation_ids[label] if continuation_ids is not None else label)
        else:
            labels.append(IGNORE_INDEX)
        previous = word
    return labels


def word_predictions(
    word_ids: Sequence[int | None], subtoken_predictions: Sequence[Any], num_words: int
) -> list[Any]:
    """The inverse of `align_word_labels`: each word takes its first sub-token's prediction.

    Words cut off by truncation have no sub-token; they come back as ``None`` so the caller decides
    (evaluation counts them as "O", prediction reports them as not covered). Special tokens and padding
    are ``None`` or negative in ``word_ids``.
    """
    predictions: list[Any] = [None] * num_words
    previous = None
    for position, word in enumerate(word_ids):
        if word is not None and word >= 0 and word != previous:
            predictions[word] = subtoken_predictions[position]
        previous = word
    return predictions


def tokenize_sequence_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    task_type: str,
    label_list: Sequence[str] | None,
    where: str,
) -> dict[str, list[Any]]:
    """``datasets.map(batched=True, with_indices=True)`` function for sequence classification / regression rows."""
    encoded = dict(tokenizer(batch["text"], truncation=True, max_length=max_length))
    if task_type == "sequence_regression":
        encoded["labels"] = [float(score) for score in batch["score"]]
    elif "label" in batch:
        if label_list is None:
            raise ValueError(f"{where}: a classification task needs its label list")
        label_index = {label: i for i, label in enumerate(label_list)}
        encoded["labels"] = [
            label_to_id(label, label_index, where=f"{where}, row {row}")
            for row, label in zip(indices, batch["label"], strict=True)
        ]
    return encoded


def tokenize_token_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    label_list: Sequence[str],
    where: str,
    label_all_subtokens: bool = False,
) -> dict[str, list[Any]]:
    """``datasets.map(batched=True, with_indices=True)`` function for token rows (words + one tag per word)."""
    if not tokenizer.is_fast:
        raise ValueError("token classification needs a fast tokenizer (word_ids); load it with use_fast=True")
    encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
    result = dict(encoded)
    result["word_ids"] = [
        [-1 if w is None else w for w in encoded.word_ids(i)] for i in range(len(batch["tokens"]))
    ]
    if "tags" in batch:
        continuation = begin_to_inside(label_list)
        label_index = {label: i for i, label in enumerate(label_list)}
        result["labels"] = []
        for i, (row, words, tags) in enumerate(zip(indices, batch["tokens"], batch["tags"], strict=True)):
            result["labels"].append(
                align_word_labels(
                    encoded.word_ids(i),
                    word_label_ids(words, tags, label_index, where=f"{where}, row {row}"),
                    label_all_subtokens=label_all_subtokens,
                    continuation_ids=continuation,
                )
            )
    return result
