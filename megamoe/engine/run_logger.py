"""Scalars of a run to TensorBoard (``<run_dir>/tensorboard``): losses per task, task weights, router losses,
expert load imbalance per layer, dropped tokens, tokens/s, learning rate, evaluation metrics."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes on rank 0 only (``enabled``); a disabled logger does nothing, so callers never branch."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, tensorboard: bool = True):
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def log_step(self, step: int, records: Sequence[Any], tokens_per_s: float) -> None:
        if self.writer is None:
            return
        last = records[-1]
        scalars: dict[str, float] = {
            "train/loss": last.loss,
            "train/aux_loss": last.aux_loss,
            "train/z_loss": last.z_loss,
            "train/lr": last.lr,
            "train/tokens_per_s": tokens_per_s,
            "train/dropped_tokens": float(sum(r.dropped_tokens for r in records)),
        }
        for record in records:
            scalars[f"task_loss/{record.task}"] = record.task_loss
        for task, weight in last.task_weights.items():
            scalars[f"task_weight/{task}"] = weight
        for layer, imbalance in enumerate(last.load_imbalance):
            scalars[f"expert_load_imbalance/moe_layer_{layer}"] = imbalance
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_evaluation(self, step: int, evaluation: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for task, splits in evaluation.items():
            if not isinstance(splits, dict):
                continue
            for split, metrics in splits.items():
                for name, value in metrics.items():
                    self.writer.add_scalar(f"{split}/{task}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
