"""The training loop: steps, evaluation cadence, logging. It never sees DeepSpeed (the engine does)."""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm


class TrainEngine(Protocol):
    @property
    def lr(self) -> float: ...

    def train_step(self, batch: dict[str, Any]) -> Any: ...


@dataclass
class StepRecord:
    """What one micro-batch did: the task it trained and the losses it produced."""

    step: int
    task: str
    loss: float
    task_loss: float
    aux_loss: float
    z_loss: float
    lr: float
    tokens: int
    task_weights: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Runs ``max_steps`` optimizer steps of ``grad_accum`` micro-batches each.

    Args:
        engine: does forward/backward/step on a micro-batch (`Engine`).
        batches: an endless iterator of micro-batches ``{"task": name, "input_ids": ..., ...}``, the same
            task sequence on every rank.
        max_steps: optimizer steps.
        grad_accum: micro-batches per optimizer step.
        evaluate: called every ``eval_every`` steps (and never when 0); returns metrics to record.
        task_weights: returns the current loss weights, for logging.
        show_progress: draw a progress bar (rank 0 only).
    """

    def __init__(
        self,
        engine: TrainEngine,
        batches: Iterator[dict[str, Any]],
        *,
        max_steps: int,
        grad_accum: int = 1,
        evaluate: Callable[[int], dict[str, Any]] | None = None,
        eval_every: int = 0,
        task_weights: Callable[[], dict[str, float]] | None = None,
        show_progress: bool = True,
    ):
        self.engine = engine
        self.batches = batches
        self.max_steps = max_steps
        self.grad_accum = grad_accum
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.task_weights = task_weights
        self.show_progress = show_progress
        self.history: list[StepRecord] = []
        self.evaluations: list[dict[str, Any]] = []

    def fit(self) -> list[StepRecord]:
        progress = tqdm(total=self.max_steps, desc="train", unit="step", disable=not self.show_progress)
        start = time.perf_counter()
        tokens = 0
        for step in range(1, self.max_steps + 1):
            for _ in range(self.grad_accum):
                batch = next(self.batches)
                output = self.engine.train_step(batch)
                record = StepRecord(
                    step=step,
                    task=batch["task"],
                    loss=float(output.loss.detach()),
                    task_loss=float(output.task_loss.detach()),
                    aux_loss=float(output.aux_loss.detach()),
                    z_loss=float(output.z_loss.detach()),
                    lr=self.engine.lr,
                    tokens=int(batch["attention_mask"].sum()),
                    task_weights=self.task_weights() if self.task_weights else {},
                )
                self.history.append(record)
                tokens += record.tokens
            progress.update(1)
            progress.set_postfix(
                task=record.task,
                loss=f"{record.task_loss:.3f}",
                tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
            )
            if (
                self.evaluate is not None
                and self.eval_every
                and step % self.eval_every == 0
                and step < self.max_steps
            ):
                self.evaluations.append({"step": step, **self.evaluate(step)})
        progress.close()
        return self.history
