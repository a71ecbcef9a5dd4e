"""What runs around the trainer's steps, as callbacks (OLMo-core's ``train/callbacks``): logging, evaluation,
checkpoint cadence. A run (or a benchmark) adds its own without touching the loop."""

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .run_logger import RunLogger

if TYPE_CHECKING:
    from .trainer import StepRecord, Trainer


def is_due(step: int, every: int) -> bool:
    """Whether ``step`` is one of every ``every`` steps (never when ``every`` is 0)."""
    return every > 0 and step % every == 0


class TrainerCallback:
    """The hooks `Trainer.fit` calls, in this order around each step; each does nothing unless overridden."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first step of this fit (after a resume, the step after the checkpoint's)."""

    def on_micro_batch_end(self, trainer: "Trainer", batch: dict[str, Any]) -> None:
        """After a micro-batch's forward, backward and (at accumulation boundaries) optimizer step were
        queued; nothing of it has been read from the device."""

    def on_log(
        self, trainer: "Trainer", step: int, records: Sequence["StepRecord"], tokens_per_s: float
    ) -> None:
        """Every ``log_every`` steps and at the last: the records of every micro-batch since the last log,
        read from the device at once. ``tokens_per_s``: real (attention-mask) tokens of every rank per second
        since the fit started."""

    def on_step_end(self, trainer: "Trainer", step: int) -> None:
        """After every optimizer step (and its `on_log`)."""


class LoggerCallback(TrainerCallback):
    """Each logging interval's scalars and the last micro-batch's expert load to ``logger`` (TensorBoard)."""

    def __init__(self, logger: RunLogger):
        self.logger = logger

    def on_log(
        self, trainer: "Trainer", step: int, records: Sequence["StepRecord"], tokens_per_s: float
    ) -> None:
        self.logger.log_step(
            step, records, tokens_per_s, trainer.last_router_stats, skipped_steps=len(trainer.skipped_steps)
        )


class EvaluationCallback(TrainerCallback):
    """``evaluate(step)`` every ``every`` steps (never when 0), recorded in ``trainer.evaluations`` (kept in
    checkpoints) and logged; not at the last step, whose evaluation is the caller's final one."""

    def __init__(
        self, evaluate: Callable[[int], dict[str, Any]], every: int, logger: RunLogger | None = None
    ):
        self.evaluate = evaluate
        self.every = every
        self.logger = logger

    def on_step_end(self, trainer: "Trainer", step: int) -> None:
        if not is_due(step, self.every) or step >= trainer.max_steps:
            return
        evaluation = {"step": step, **self.evaluate(step)}
        trainer.evaluations.append(evaluation)
        if self.logger is not None:
            self.logger.log_evaluation(step, evaluation)


class CheckpointCallback(TrainerCallback):
    """``save(step)`` every ``every`` steps (never when 0)."""

    def __init__(self, save: Callable[[int], Any], every: int):
        self.save = save
        self.every = every

    def on_step_end(self, trainer: "Trainer", step: int) -> None:
        if is_due(step, self.every):
            self.save(step)
