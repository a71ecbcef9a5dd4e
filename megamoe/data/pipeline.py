"""From the run config's task list to tokenized splits: load, trim, infer labels, tokenize."""

from dataclasses import dataclass
from functools import partial

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..config import ExperimentConfig, TaskConfig
from .local import load_task_dataset
from .tokenization import tokenize_sequence_batch, tokenize_token_batch


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


def infer_labels(train: Dataset, task: TaskConfig) -> list[str]:
    """Sorted label names seen in the training split (tags of every sentence for token tasks)."""
    if task.type == "token_classification":
        seen = {tag for tags in train["tags"] for tag in tags}
        # IOB2 convention: O first, then the entity tags grouped by type (B- before I-).
        return sorted(seen, key=lambda tag: (tag != "O", tag[2:], tag[:2]))
    return sorted(set(train["label"]), key=str)


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
            cache_dir=config.data.cache_dir,
        )
        if task.max_train_examples is not None:
            raw["train"] = raw["train"].select(range(min(task.max_train_examples, len(raw["train"]))))
        labels = (
            None if task.type == "sequence_regression" else task.labels or infer_labels(raw["train"], task)
        )
        tokenized = DatasetDict()
        for split, dataset in raw.items():
            where = f"task {name!r}, split {split!r}"
            if task.type == "token_classification":
                assert labels is not None
                fn = partial(
                    tokenize_token_batch,
                    tokenizer=tokenizer,
                    max_length=config.data.max_length,
                    label_list=labels,
                    where=where,
                    label_all_subtokens=config.data.label_all_subtokens,
                )
            else:
                fn = partial(
                    tokenize_sequence_batch,
                    tokenizer=tokenizer,
                    max_length=config.data.max_length,
                    task_type=task.type,
                    label_list=labels,
                    where=where,
                )
            tokenized[split] = dataset.map(
                fn, batched=True, with_indices=True, desc=f"tokenize {name}/{split}"
            )
        tasks[name] = TaskData(name=name, type=task.type, labels=labels, splits=tokenized)
    return tasks
