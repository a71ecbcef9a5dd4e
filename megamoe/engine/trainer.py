"""The training loop: micro-batches and optimizer steps; logging, evaluation and checkpoints are callbacks
(`megamoe.engine.callbacks`). It never sees DeepSpeed.

A step whose gradients are not finite on some rank is skipped, on every rank (the engine's `step_applied`),
counted, and left out of the logged means; ``max_skipped_steps_in_a_row`` of them in a row end the run with
`TrainingDivergedError`, whose message names the steps and the last checkpoint to go back to.

Nothing is read from the device between logging intervals: each micro-batch's losses and router statistics
stay device tensors (one small vector per micro-batch) until the next ``log_every`` step, or a checkpoint,
reads all of them at once, as OLMo-core's ``metrics_collect_interval`` does. On a GPU a ``float(loss)``
per micro-batch would wait for the device every step and keep the host from queueing the next one.
"""

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .callbacks import TrainerCallback, is_due


class TrainEngine(Protocol):
    @property
    def lr(self) -> float: ...

    @property
    def step_applied(self) -> bool:
        """Whether the last optimizer step updated the model (not skipped for non-finite gradients), the same
        on every rank; read without waiting for the device."""
        ...

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
    """The loss weights when the record was read from the device: on the last micro-batch of each logging
    interval (reading them is a device read too), ``{}`` on the others."""
    load_imbalance: list[float] = field(default_factory=list)
    """Per MoE layer, in the model's order (`MegaMoEConfig.moe_layers()`): max / mean tokens per expert on
    this rank (1 = perfectly balanced)."""
    dropped_tokens: int = 0
    """(token, slot) assignments dropped at capacity, all layers (0 when dropless)."""
    skipped: bool = False
    """The optimizer step of this micro-batch was skipped: some rank's gradients were not finite. Its numbers
    (possibly NaN) are kept here and left out of the logged means."""


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients: the run stops instead of spinning."""


@dataclass
class _PendingRecord:
    """A micro-batch's `StepRecord` whose numbers are still on the device, in ``values``: loss, task loss,
    aux loss, z-loss, dropped assignments, then each MoE layer's load imbalance."""

    step: int
    task: str
    lr: float
    tokens: int
    values: torch.Tensor
    skipped: bool = False


def _device_values(output: Any) -> torch.Tensor:
    """`_PendingRecord.values` of a forward output, computed on its device without reading anything back."""
    losses = [output.loss, output.task_loss, output.aux_loss, output.z_loss]
    scalars = [value.detach().float().reshape(()) for value in losses]
    stats = output.router_stats or []
    dropped = sum(
        (layer.dropped_tokens.float() for layer in stats), torch.zeros((), device=scalars[0].device)
    )
    imbalance = []
    for layer in stats:
        counts = layer.tokens_per_expert.detach().float()
        imbalance.append(counts.max() / counts.mean().clamp(min=1e-9))
    return torch.stack([*scalars, dropped.reshape(()), *imbalance])


class Trainer:
    """Runs optimizer steps ``start_step + 1 .. max_steps`` of ``grad_accum`` micro-batches each.

    Args:
        engine: does forward/backward/step on a micro-batch (`Engine`).
        batches: an endless iterator of micro-batches ``{"task": name, "input_ids": ..., ...}``, the same
            task sequence on every rank.
        max_steps: optimizer steps.
        grad_accum: micro-batches per optimizer step.
        task_weights: returns the current loss weights, read with each logging interval's numbers.
        callbacks: logging, evaluation, checkpoints, ... (`megamoe.engine.callbacks`), called in order.
        log_every: steps between reads of the device's numbers (`TrainerCallback.on_log`, the progress
            bar's loss).
        max_skipped_steps_in_a_row: skipped steps in a row that end the run (0: never).
        last_checkpoint: the step of the newest complete checkpoint, for the message that ends a diverged run.
        show_progress: draw a progress bar (rank 0 only).
    """

    def __init__(
        self,
        engine: TrainEngine,
        batches: Iterator[dict[str, Any]],
        *,
        max_steps: int,
        grad_accum: int = 1,
        task_weights: Callable[[], dict[str, float]] | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        log_every: int = 10,
        max_skipped_steps_in_a_row: int = 20,
        last_checkpoint: Callable[[], int | None] = lambda: None,
        show_progress: bool = True,
    ):
        self.engine = engine
        self.batches = batches
        self.max_steps = max_steps
        self.grad_accum = grad_accum
        self.task_weights = task_weights
        self.callbacks = list(callbacks)
        self.log_every = log_every
        self.max_skipped_steps_in_a_row = max_skipped_steps_in_a_row
        self.last_checkpoint = last_checkpoint
        self.show_progress = show_progress
        self.step = 0
        self.skipped_steps: list[int] = []
        """The optimizer steps skipped for non-finite gradients (kept in checkpoints)."""
        self.history: list[StepRecord] = []
        self.evaluations: list[dict[str, Any]] = []
        self.last_router_stats: Any = None
        """The last micro-batch's router statistics (device tensors)."""
        self._pending: list[_PendingRecord] = []
        self._logged = 0  # records of `history` already logged
        self._device = torch.device("cpu")  # the engine's, seen on the first micro-batch's output

    def state_dict(self) -> dict[str, Any]:
        self._read_pending()  # a checkpoint holds every step's record
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "history": [asdict(r) for r in self.history],
            "evaluations": self.evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        # Checkpoints written before 2026-12-02 have no skipped steps.
        self.skipped_steps = list(state.get("skipped_steps", []))
        self.history = [StepRecord(**r) for r in state["history"]]
        self._logged = len(self.history)
        self.evaluations = list(state["evaluations"])

    def fit(self) -> list[StepRecord]:
        progress = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.show_progress,
        )
        for callback in self.callbacks:
            callback.on_fit_start(self)
        start, tokens = time.perf_counter(), 0
        while self.step < self.max_steps:
            self.step += 1
            for _ in range(self.grad_accum):
                tokens += self._micro_step(self.step)
            if not self.engine.step_applied:
                self._skipped(progress)
            progress.update(1)
            if is_due(self.step, self.log_every) or self.step == self.max_steps:
                # Every rank's real tokens (not padding): the job's throughput, not rank 0's.
                all_ranks = _sum_over_ranks(tokens, self._device)
                self._log(progress, all_ranks / (time.perf_counter() - start))
            for callback in self.callbacks:
                callback.on_step_end(self, self.step)
        progress.close()
        return self.history

    def _micro_step(self, step: int) -> int:
        """One micro-batch, queued on the device; returns its real (attention-mask) tokens."""
        batch = next(self.batches)
        tokens = int(batch["attention_mask"].sum())  # the host's copy of the batch: no device read
        output = self.engine.train_step(batch)
        values = _device_values(output)
        self._device = values.device
        self._pending.append(_PendingRecord(step, batch["task"], self.engine.lr, tokens, values))
        self.last_router_stats = output.router_stats
        for callback in self.callbacks:
            callback.on_micro_batch_end(self, batch)
        return tokens

    def _skipped(self, progress: Any) -> None:
        """Step `step` was skipped on every rank: marked, counted, said, and the end of the run if it is the
        ``max_skipped_steps_in_a_row``-th in a row."""
        for pending in self._pending[-self.grad_accum :]:
            pending.skipped = True
        self.skipped_steps.append(self.step)
        in_a_row = 0
        while (
            in_a_row < len(self.skipped_steps) and self.skipped_steps[-1 - in_a_row] == self.step - in_a_row
        ):
            in_a_row += 1
        if self.show_progress:
            progress.write(
                f"step {self.step}: the loss or gradients are not finite on some rank; the step is skipped "
                f"({in_a_row} in a row, {len(self.skipped_steps)} in all)"
            )
        if self.max_skipped_steps_in_a_row and in_a_row >= self.max_skipped_steps_in_a_row:
            checkpoint = self.last_checkpoint()
            tasks = sorted({pending.task for pending in self._pending[-self.grad_accum :]})
            raise TrainingDivergedError(
                f"steps {self.step - in_a_row + 1}..{self.step}: {in_a_row} optimizer steps in a row had an inf "
                f"or NaN loss or gradient on some rank and were skipped (train.max_skipped_steps_in_a_row="
                f"{self.max_skipped_steps_in_a_row}); the last one trained {', '.join(tasks)}. Skipped steps "
                "change no weight, so "
                + (
                    f"the newest checkpoint (step {checkpoint}) is sound to resume from (--resume)"
                    if checkpoint is not None
                    else "nothing is lost but the time; no checkpoint was saved yet"
                )
                + ". To fix: a lower train.lr, a longer train.warmup_ratio, train.max_grad_norm > 0, precision "
                "fp32 instead of fp16, or a look at that task's data."
            )

    def _read_pending(self) -> None:
        """The queued micro-batches' numbers, read from the device at once, into `history`. The loss weights
        are read then too, onto the last record (others keep ``{}``)."""
        if not self._pending:
            return
        rows = torch.stack([pending.values for pending in self._pending]).cpu().tolist()
        for pending, row in zip(self._pending, rows, strict=True):
            loss, task_loss, aux_loss, z_loss, dropped, *imbalance = row
            self.history.append(
                StepRecord(
                    step=pending.step,
                    task=pending.task,
                    loss=loss,
                    task_loss=task_loss,
                    aux_loss=aux_loss,
                    z_loss=z_loss,
                    lr=pending.lr,
                    tokens=pending.tokens,
                    load_imbalance=imbalance,
                    dropped_tokens=round(dropped) if math.isfinite(dropped) else 0,
                    skipped=pending.skipped,
                )
            )
        self.history[-1].task_weights = self.task_weights() if self.task_weights else {}
        self._pending.clear()

    def _log(self, progress: Any, tokens_per_s: float) -> None:
        self._read_pending()
        window = self.history[self._logged :]
        self._logged = len(self.history)
        if not window:
            return
        progress.set_postfix(
            task=window[-1].task, loss=f"{window[-1].task_loss:.3f}", real_tok_s=f"{tokens_per_s:.0f}"
        )
        for callback in self.callbacks:
            callback.on_log(self, self.step, window, tokens_per_s)


def _sum_over_ranks(count: int, device: torch.device) -> int:
    """``count`` summed over every rank: one all-reduce per logging interval (every rank logs at the same
    steps); ``count`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return count
    total = torch.tensor(count, dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total)
