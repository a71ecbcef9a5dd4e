"""Evaluate every task on a split: predictions back to labels (words for NER), metrics, expert utilization.

Under a launcher each rank evaluates every ``world_size``-th example and the predictions are gathered, so
evaluation takes 1 / world_size of the time; each rank batches its examples longest first, so a batch is
padded to about its own rows' lengths. Every rank runs the same number of forward passes, on the same
task, in the same order: expert parallelism's all-to-all and ZeRO-3's parameter gathers are collectives.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..data.collate import MultiTaskCollator
from ..data.pipeline import TaskData
from ..data.tokenization import word_predictions
from .metrics import ExpertUtilization, classification_metrics, ner_metrics, regression_metrics

Forward = Callable[[dict[str, Any]], Any]
Result = tuple[int, Any, Any]
"""(example index, prediction, reference)."""


@dataclass(frozen=True)
class EvalShard:
    """This rank's share of every split: examples ``rank, rank + world_size, ...``."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def of_process_group(cls) -> "EvalShard":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def indices(self, num_examples: int) -> list[int]:
        return list(range(self.rank, num_examples, self.world_size))

    def num_batches(self, num_examples: int, batch_size: int) -> int:
        """The same on every rank: enough for the largest shard."""
        largest_shard = -(-num_examples // self.world_size)
        return -(-largest_shard // batch_size)

    def gather(self, local: Any) -> list[Any]:
        """Every rank's ``local``, in rank order (a collective)."""
        if self.world_size == 1:
            return [local]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        return gathered


@torch.no_grad()
def shard_results(
    forward: Forward,
    task: TaskData,
    split: str,
    collate: MultiTaskCollator,
    *,
    batch_size: int,
    utilization: ExpertUtilization,
    shard: EvalShard,
    on_batch: Callable[[], object] = lambda: None,
) -> list[Result]:
    """Predictions for this rank's examples of ``task``'s ``split``, in batches of rows of similar length;
    ``on_batch`` is called after each (a progress bar's step)."""
    dataset = task.splits[split]
    # Longest first: a batch of rows in split order pads to about the split's longest row (64 short tweets
    # beside one long one); sorted, each batch pads only to its own longest. Results carry their example index,
    # so the order changes no metric. The lengths come from Arrow, not from a Python list of every token.
    lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()
    mine = sorted(shard.indices(len(dataset)), key=lambda index: -lengths[index])
    results: list[Result] = []
    for batch_idx in range(shard.num_batches(len(dataset), batch_size)):
        indices = mine[batch_idx * batch_size : (batch_idx + 1) * batch_size]
        # A rank whose shard ran out still runs a forward (on example 0, discarded): the others wait for it.
        rows = list(dataset.select(indices or [0]))
        batch = collate(rows, task=task.name)
        output = forward(batch)
        on_batch()
        if not indices:
            continue
        utilization.update(task.name, output.router_stats)
        logits = output.logits.float().cpu()
        if task.type == "sequence_regression":
            predictions = logits.squeeze(-1).tolist()
            references = [row["score"] for row in rows]
        elif task.type == "sequence_classification":
            predictions = logits.argmax(-1).tolist()
            references = batch["labels"].tolist()
        else:
            assert task.labels is not None
            predictions, references = [], []
            for row, row_predictions in zip(rows, logits.argmax(-1).tolist(), strict=True):
                words = word_predictions(row["word_ids"], row_predictions, len(row["tokens"]))
                # Words cut off by truncation were never seen: predicted "O".
                predictions.append(["O" if label is None else task.labels[label] for label in words])
                references.append(row["tags"])
        results += zip(indices, predictions, references, strict=True)
    return results


def task_metrics(task: TaskData, results: list[Result]) -> dict[str, float]:
    """The task's metrics over ``results`` (any order)."""
    ordered = sorted(results, key=lambda result: result[0])
    predictions = [prediction for _, prediction, _ in ordered]
    references = [reference for _, _, reference in ordered]
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
    shard: EvalShard | None = None,
) -> tuple[dict[str, dict[str, dict[str, float]]], ExpertUtilization]:
    """``{task: {split: metrics}}`` and the expert utilization seen on those splits, the same on every rank.

    ``shard``: this rank's share (default: from the process group, the whole split without one).
    """
    shard = shard or EvalShard.of_process_group()
    utilization = ExpertUtilization()
    jobs = [(name, split) for name in sorted(tasks) for split in splits]
    batches = sum(shard.num_batches(len(tasks[name].splits[split]), batch_size) for name, split in jobs)
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    with tqdm(
        total=batches, desc=f"evaluate ({', '.join(splits)})", unit="batch", disable=not show_progress
    ) as progress:
        for name, split in jobs:
            local = shard_results(
                forward,
                tasks[name],
                split,
                collate,
                batch_size=batch_size,
                utilization=utilization,
                shard=shard,
                on_batch=progress.update,
            )
            every_rank = [result for results in shard.gather(local) for result in results]
            metrics.setdefault(name, {})[split] = task_metrics(tasks[name], every_rank)
    return metrics, utilization.merged(shard.gather(utilization.counts))
