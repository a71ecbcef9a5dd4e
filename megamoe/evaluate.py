"""A trained model's task head on a labelled dataset from anywhere: another domain's texts of the same task, a
Hub dataset, a local file. The metrics are the ones training reports, computed by the same code
(`megamoe.tasks.evaluation`), so a number here compares with one in a run's ``metrics.json``.

    report = evaluate_model("runs/quickstart/model", "sentiment", "builtin:vader_reviews_editorials", split="all")
    report.metrics  # {"accuracy": ..., "macro_f1": ...}
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import DatasetDict, concatenate_datasets

from .data.collate import MultiTaskCollator
from .data.local import load_task_dataset
from .data.pipeline import TaskData, tokenize_split
from .data.text_files import DataError
from .predict import load_trained_model
from .tasks.evaluation import EvalShard, evaluate
from .tasks.objective import MODEL_INPUTS

SPLIT_CHOICES = ("train", "validation", "test", "all")


@dataclass(frozen=True)
class EvaluationReport:
    """What `evaluate_model` measured, on how many examples."""

    task: str
    source: str
    split: str
    examples: int
    max_length: int
    metrics: dict[str, float]


def evaluate_model(
    model_source: str,
    task: str,
    source: str,
    *,
    split: str = "test",
    max_length: int | None = None,
    max_examples: int | None = None,
    batch_size: int = 64,
    columns: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool = False,
) -> EvaluationReport:
    """``task``'s head of the model at ``model_source`` (a directory or Hub repo id) on ``split`` of
    ``source`` (``all``: every row of every split; ``max_examples``: the first n). ``max_length``: truncation
    in tokens, default the model's longest (pass the training length to evaluate as training did).
    ``columns``: ``text_column`` / ``label_column`` / ``tokens_column`` / ``tags_column`` of the source.

    Raises ValueError for an unknown task or split, `DataError` / `LabelError` for data that does not fit the
    task (a label the head does not have, named with its row)."""
    if split not in SPLIT_CHOICES:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLIT_CHOICES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_trained_model(model_source, device)
    if task not in model.config.tasks:
        raise ValueError(f"the model has no task {task!r}; its tasks: {sorted(model.config.tasks)}")
    spec = model.config.tasks[task]
    labels = spec.get("labels")
    raw = load_task_dataset(
        source, task_type=spec["type"], labels=labels, cache_dir=cache_dir, carve=False, **(columns or {})
    )
    if split == "all":
        dataset = concatenate_datasets([raw[name] for name in raw])
    elif split in raw:
        dataset = raw[split]
    else:
        raise DataError(
            f"{source} has no {split} split (it has: {', '.join(raw)}); split 'all' takes every row"
        )
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    length = min(max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
    tokenized = tokenize_split(
        dataset,
        task_type=spec["type"],
        tokenizer=tokenizer,
        max_length=length,
        labels=labels,
        where=f"{source}, split {split!r}",
    )
    data = TaskData(name=task, type=spec["type"], labels=labels, splits=DatasetDict({split: tokenized}))
    model.eval()

    def forward(batch: dict) -> object:
        inputs = {name: batch[name].to(device) for name in MODEL_INPUTS if name in batch}
        return model(**inputs, task=task)

    collate = MultiTaskCollator(tokenizer.pad_token_id)
    metrics, _ = evaluate(
        forward,
        {task: data},
        (split,),
        collate,
        batch_size=batch_size,
        show_progress=show_progress,
        shard=EvalShard(),
    )
    return EvaluationReport(task, source, split, len(dataset), length, metrics[task][split])
