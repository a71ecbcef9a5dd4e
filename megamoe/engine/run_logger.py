"""A run's scalars to TensorBoard (``<run_dir>/tensorboard``): losses per task, task weights, router losses,
expert load per layer (histograms) and its imbalance, dropped tokens, tokens/s, learning rate, evaluation
metrics."""

from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

import torch


class RunLogger:
    """Writes on rank 0 only (``enabled``); a disabled logger does nothing, so callers never branch."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, tensorboard: bool = True):
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def log_step(
        self,
        step: int,
        records: Sequence[Any],
        tokens_per_s: float,
        router_stats: Sequence[Any] | None = None,
        skipped_steps: int = 0,
    ) -> None:
        """Scalars of the micro-batches since the last log (their ``StepRecord``s): losses, load imbalance
        and each task's loss as means over them (a task's over its own micro-batches: every one counts, not
        only the last step's), dropped assignments summed; the expert load of the last micro-batch as one
        histogram per MoE layer (tokens over expert ids: flat = balanced). Micro-batches of skipped steps
        (non-finite gradients) are left out of the means; ``skipped_steps`` is the run's count of them."""
        if self.writer is None:
            return
        self.writer.add_scalar("train/skipped_steps", skipped_steps, step)
        records = [record for record in records if not record.skipped]
        if not records:
            return
        # Tags name the model's layer index (`layers.<i>`, `RouterStats.layer_idx`), as the model card and
        # expert_utilization.json do: with moe_layer_freq 2 the MoE layers are 1, 3, 5, not 0, 1, 2.
        layers = [stats.layer_idx for stats in router_stats or []]
        for stats in router_stats or []:
            counts = stats.tokens_per_expert.detach().cpu()
            expert_of_each_assignment = torch.repeat_interleave(torch.arange(counts.numel()), counts)
            self.writer.add_histogram(
                f"expert_load/layer_{stats.layer_idx}", expert_of_each_assignment, step, bins=counts.numel()
            )
        last = records[-1]
        scalars: dict[str, float] = {
            "train/loss": mean(r.loss for r in records),
            "train/aux_loss": mean(r.aux_loss for r in records),
            "train/z_loss": mean(r.z_loss for r in records),
            "train/lr": last.lr,
            "train/real_tokens_per_s": tokens_per_s,
            "train/dropped_tokens": float(sum(r.dropped_tokens for r in records)),
        }
        for task in sorted({r.task for r in records}):
            scalars[f"task_loss/{task}"] = mean(r.task_loss for r in records if r.task == task)
        weighted = [r for r in records if r.task_weights]
        for task, weight in (weighted[-1].task_weights if weighted else {}).items():
            scalars[f"task_weight/{task}"] = weight
        for layer, imbalances in zip(
            layers, zip(*(r.load_imbalance for r in records), strict=True), strict=True
        ):
            scalars[f"expert_load_imbalance/layer_{layer}"] = mean(imbalances)
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
