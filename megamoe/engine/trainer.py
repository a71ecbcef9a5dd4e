"""The training loop: steps, evaluation and checkpoint cadence, logging. It never sees DeepSpeed."""

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from .run_logger import RunLogger


class TrainEngine(Protocol):
    @property
    def lr(self) -> float: ...

    def train_step(self, batch: dict[str, Any]) -> Any: ...


@dataclass
class StepRecord:
    """What one micro-batch did: the task it trained, the losses it produced, what its routers did."""

    step: int
    task: str
    loss: float
    task_loss: float
    aux_loss: float
    z_loss: float
    lr: float
    tokens: int
    task_weights: dict[str, float] = field(default_factory=dict)
    load_imbalance: list[float] = field(default_factory=list)
    """Per MoE layer: max / mean tokens per expert on this rank (1 = perfectly balanced)."""
    dropped_tokens: int = 0
    """(token, slot) assignments dropped at capacity, all layers (0 when dropless)."""


def _router_summary(output: Any) -> tuple[list[float], int]:
    stats = output.router_stats or []
    imbalance = []
    for layer in stats:
        counts = layer.tokens_per_expert.detach().float()
        imbalance.append(float(counts.max() / counts.mean().clamp(min=1e-9)))
    return imbalance, int(sum(int(layer.dropped_tokens) for layer in stats))


class Trainer:
    """Runs optimizer steps ``start_step + 1 .. max_steps`` of ``grad_accum`` micro-batches each.

    Args:
        engine: does forward/backward/step on a micro-batch (`Engine`).
        batches: an endless iterator of micro-batches ``{"task": name, "input_ids": ..., ...}``, the same
            task sequence on every rank.
        max_steps: optimizer steps.
        grad_accum: micro-batches per optimizer step.
        evaluate: called every ``eval_every`` steps (and never when 0); returns metrics to record.
        task_weights: returns the current loss weights, for logging.
        on_step_end: called after every optimizer step with its number (checkpointing).
        logger: where scalars go every ``log_every`` steps (TensorBoard, rank 0).
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
        on_step_end: Callable[[int], None] | None = None,
        logger: RunLogger | None = None,
        log_every: int = 10,
        show_progress: bool = True,
    ):
        self.engine = engine
        self.batches = batches
        self.max_steps = max_steps
        self.grad_accum = grad_accum
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.task_weights = task_weights
        self.on_step_end = on_step_end
        self.logger = logger
        self.log_every = log_every
        self.show_progress = show_progress
        self.step = 0
        self.history: list[StepRecord] = []
        self.evaluations: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": [asdict(r) for r in self.history],
            "evaluations": self.evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.history = [StepRecord(**r) for r in state["history"]]
        self.evaluations = list(state["evaluations"])

    def fit(self) -> list[StepRecord]:
        progress = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.show_progress,
        )
        start, tokens = time.perf_counter(), 0
        while self.step < self.max_steps:
            self.step += 1
            micro_steps = [self._micro_step(self.step) for _ in range(self.grad_accum)]
            step_records = [record for record, _ in micro_steps]
            tokens += sum(r.tokens for r in step_records)
            tokens_per_s = tokens / (time.perf_counter() - start)
            record = step_records[-1]
            progress.update(1)
            progress.set_postfix(
                task=record.task, loss=f"{record.task_loss:.3f}", tok_s=f"{tokens_per_s:.0f}"
            )
            if self.logger is not None and self._due(self.log_every):
                self.logger.log_step(self.step, step_records, tokens_per_s, micro_steps[-1][1].router_stats)
            # The last step's evaluation is the caller's final one.
            if self.evaluate is not None and self._due(self.eval_every) and self.step < self.max_steps:
                evaluation = {"step": self.step, **self.evaluate(self.step)}
                self.evaluations.append(evaluation)
                if self.logger is not None:
                    self.logger.log_evaluation(self.step, evaluation)
            if self.on_step_end is not None:
                self.on_step_end(self.step)
        progress.close()
        return self.history

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _micro_step(self, step: int) -> tuple[StepRecord, Any]:
        batch = next(self.batches)
        output = self.engine.train_step(batch)
        imbalance, dropped = _router_summary(output)
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
            load_imbalance=imbalance,
            dropped_tokens=dropped,
        )
        self.history.append(record)
        return record, output
