"""Task metrics, per-task expert utilization, and the metrics table / metrics.json of a run."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.scheme import IOB2


def classification_metrics(
    predictions: Sequence[int], references: Sequence[int], num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over labels present in predictions or references)."""
    pred, ref = np.asarray(predictions), np.asarray(references)
    f1s = []
    for label in range(num_labels):
        tp = np.sum((pred == label) & (ref == label))
        fp = np.sum((pred == label) & (ref != label))
        fn = np.sum((pred != label) & (ref == label))
        if tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(pred == ref)), "macro_f1": float(np.mean(f1s))}


def ner_metrics(predictions: list[list[str]], references: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision / recall / F1, strict IOB2 (seqeval), plus F1 per entity type."""
    kwargs: dict[str, Any] = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    metrics = {
        "precision": float(precision_score(references, predictions, **kwargs)),
        "recall": float(recall_score(references, predictions, **kwargs)),
        "f1": float(f1_score(references, predictions, **kwargs)),
    }
    report = classification_report(references, predictions, output_dict=True, **kwargs)
    for entity, scores in report.items():
        if not entity.endswith(" avg"):
            metrics[f"f1_{entity}"] = float(scores["f1-score"])
    return metrics


def regression_metrics(predictions: Sequence[float], references: Sequence[float]) -> dict[str, float]:
    pred, ref = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    pearson = float(np.corrcoef(pred, ref)[0, 1]) if pred.std() > 0 and ref.std() > 0 else 0.0
    return {"mae": float(np.mean(np.abs(pred - ref))), "pearson": pearson}


class ExpertUtilization:
    """Per task and MoE layer, the fraction of the task's (token, slot) assignments each expert received."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[int, torch.Tensor]] = {}

    def update(self, task: str, router_stats: Sequence[Any]) -> None:
        for stats in router_stats:
            self._add(task, stats.layer_idx, stats.tokens_per_expert.detach().to("cpu", torch.float64))

    def merged(self, every_rank: Sequence[dict[str, dict[int, torch.Tensor]]]) -> "ExpertUtilization":
        """The utilization over every rank's ``counts`` (each rank saw its own shard of the examples)."""
        total = ExpertUtilization()
        for counts in every_rank:
            for task, layers in counts.items():
                for layer, layer_counts in layers.items():
                    total._add(task, layer, layer_counts)
        return total

    def _add(self, task: str, layer: int, counts: torch.Tensor) -> None:
        per_layer = self.counts.setdefault(task, {})
        per_layer[layer] = per_layer.get(layer, torch.zeros_like(counts)) + counts

    def fractions(self) -> dict[str, dict[int, list[float]]]:
        return {
            task: {layer: (c / c.sum().clamp(min=1)).tolist() for layer, c in sorted(layers.items())}
            for task, layers in self.counts.items()
        }

    def imbalance(self) -> dict[str, dict[int, float]]:
        """max / mean of the expert loads: 1.0 is perfectly balanced, E means one expert takes everything."""
        return {
            task: {layer: float(c.max() / c.mean().clamp(min=1e-12)) for layer, c in sorted(layers.items())}
            for task, layers in self.counts.items()
        }


def format_metrics_table(metrics: dict[str, dict[str, dict[str, float]]]) -> str:
    """``{task: {split: {metric: value}}}`` as an aligned text table (per-entity F1s left out)."""
    rows = [("task", "split", "metric", "value")]
    for task in sorted(metrics):
        for split, values in metrics[task].items():
            for name, value in values.items():
                if not name.startswith("f1_"):
                    rows.append((task, split, name, f"{value:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
    )
