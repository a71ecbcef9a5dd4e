"""Evaluate every task on a split: predictions back to labels (words for NER), metrics, expert utilization."""

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.collate import MultiTaskCollator
from ..data.pipeline import TaskData
from ..data.tokenization import word_predictions
from .metrics import ExpertUtilization, classification_metrics, ner_metrics, regression_metrics

Forward = Callable[[dict[str, Any]], Any]


@torch.no_grad()
def evaluate_task(
    forward: Forward,
    task: TaskData,
    split: str,
    collate: MultiTaskCollator,
    *,
    batch_size: int,
    utilization: ExpertUtilization,
) -> dict[str, float]:
    dataset = task.splits[split]
    predictions: list[Any] = []
    references: list[Any] = []
    for start in range(0, len(dataset), batch_size):
        rows = list(dataset.select(range(start, min(start + batch_size, len(dataset)))))
        batch = collate(rows, task=task.name)
        output = forward(batch)
        utilization.update(task.name, output.router_stats)
        logits = output.logits.float().cpu()
        if task.type == "sequence_regression":
            predictions += logits.squeeze(-1).tolist()
            references += [row["score"] for row in rows]
        elif task.type == "sequence_classification":
            predictions += logits.argmax(-1).tolist()
            references += batch["labels"].tolist()
        else:
            assert task.labels is not None
            subtoken_ids = logits.argmax(-1).tolist()
            for row, row_predictions in zip(rows, subtoken_ids, strict=True):
                words = word_predictions(row["word_ids"], row_predictions, len(row["tokens"]))
                # Words cut off by truncation were never seen: predicted "O".
                predictions.append(["O" if label is None else task.labels[label] for label in words])
                references.append(row["tags"])
    if task.type == "sequence_regression":
        return regression_metrics(predictions, references)
    if task.type == "sequence_classification":
        assert task.labels is not None
        return classification_metrics(predictions, references, len(task.labels))
    return ner_metrics(predictions, references)


def evaluate(
    forward: Forward,
    tasks: dict[str, TaskData],
    splits: tuple[str, ...],
    collate: MultiTaskCollator,
    *,
    batch_size: int = 64,
    show_progress: bool = False,
) -> tuple[dict[str, dict[str, dict[str, float]]], ExpertUtilization]:
    """``{task: {split: metrics}}`` and the expert utilization seen on those splits."""
    utilization = ExpertUtilization()
    jobs = [(name, split) for name in sorted(tasks) for split in splits]
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for name, split in tqdm(jobs, desc=f"evaluate ({', '.join(splits)})", disable=not show_progress):
        metrics.setdefault(name, {})[split] = evaluate_task(
            forward, tasks[name], split, collate, batch_size=batch_size, utilization=utilization
        )
    return metrics, utilization
