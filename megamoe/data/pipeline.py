"""From the run config's task list to tokenized splits: load, trim, infer labels, tokenize."""

import re
from dataclasses import dataclass
from functools import partial

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..config import ExperimentConfig, TaskConfig
from .local import load_task_dataset
from .tokenization import LabelError, tokenize_sequence_batch, tokenize_token_batch

IOB2_TAG = re.compile(r"[BI]-.+")


@dataclass
class TaskData:
    """One task's tokenized splits and its label list (None for regression)."""

    name: str
    type: str
    labels: list[str] | None
    splits: DatasetDict

    @property
    def model_spec(self) -> dict:
        """The task entry of `MegaMoEConfig.tasks`."""
        return {"type": self.type} if self.labels is None else {"type": self.type, "labels": self.labels}


def infer_labels(splits: DatasetDict, task: TaskConfig) -> list[str]:
    """The label set of a task declared without one: every label seen in any split (the set is metadata,
    not training signal, and a label only the test split has would otherwise fail evaluation).

    Token tasks get the full IOB2 set: O first, then B-/I- for every entity type seen, grouped by type.
    """
    if task.type == "token_classification":
        tags = {tag for ds in splits.values() for row in ds["tags"] for tag in row} - {"O"}
        not_iob2 = sorted(
            (tag for tag in tags if not (isinstance(tag, str) and IOB2_TAG.fullmatch(tag))), key=str
        )
        if not_iob2:
            raise LabelError(
                f"{task.source}: tags must be IOB2 names (O, B-TYPE, I-TYPE) for the label set to be inferred, "
                f"got {not_iob2[:5]}: convert IOBES / bare types to IOB2, or declare the task's labels "
                "(tag names, in id order for numeric tags)"
            )
        types = {tag[2:] for tag in tags}
        return ["O"] + [f"{prefix}-{entity}" for entity in sorted(types) for prefix in ("B", "I")]
    return sorted({label for ds in splits.values() for label in ds["label"]}, key=str)


def prepare_task_data(config: ExperimentConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, TaskData]:
    """Load and tokenize every task of the run, in sorted task order."""
    tasks = {}
    for name in sorted(config.tasks):
        task = config.tasks[name]
        raw = load_task_dataset(
            task.source,
            task_type=task.type,
            text_column=task.text_column,
            label_column=task.label_column,
            tokens_column=task.tokens_column,
            tags_column=task.tags_column,
            labels=task.labels,
            cache_dir=config.data.cache_dir,
        )
        labels = None if task.type == "sequence_regression" else task.labels or infer_labels(raw, task)
        limits = {
            "train": task.max_train_examples,
            "validation": task.max_eval_examples,
            "test": task.max_eval_examples,
        }
        for split, limit in limits.items():
            if limit is not None:
                raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
        max_length = task.max_length or config.data.max_length
        tokenized = DatasetDict(
            {
                split: tokenize_split(
                    dataset,
                    task_type=task.type,
                    tokenizer=tokenizer,
                    max_length=max_length,
                    labels=labels,
                    where=f"task {name!r}, split {split!r}",
                    label_all_subtokens=config.data.label_all_subtokens,
                )
                for split, dataset in raw.items()
            }
        )
        tasks[name] = TaskData(name=name, type=task.type, labels=labels, splits=tokenized)
    return tasks


def tokenize_split(
    dataset: Dataset,
    *,
    task_type: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    labels: list[str] | None,
    where: str,
    label_all_subtokens: bool = False,
) -> Dataset:
    """One split of a task, tokenized for the model: ids, mask, labels (per sub-token for NER, with the word
    alignment evaluation maps predictions back through)."""
    if task_type == "token_classification":
        assert labels is not None
        fn = partial(
            tokenize_token_batch,
            tokenizer=tokenizer,
            max_length=max_length,
            label_list=labels,
            where=where,
            label_all_subtokens=label_all_subtokens,
        )
    else:
        fn = partial(
            tokenize_sequence_batch,
            tokenizer=tokenizer,
            max_length=max_length,
            task_type=task_type,
            label_list=labels,
            where=where,
        )
    return dataset.map(fn, batched=True, with_indices=True, desc=f"tokenize {where}")
