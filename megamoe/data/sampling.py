"""Which task each micro-batch trains, and which examples each data-parallel rank gets.

Every rank must run the same task in the same micro-batch (the MoE all-to-alls and the task heads stay in
lockstep), so the task schedule is a pure function of (seed, step): no communication, and resuming at step
s replays it exactly. Examples are shuffled per task and epoch with the same permutation on every rank and
sharded by data-parallel rank.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np

SAMPLING_STRATEGIES = ("proportional", "temperature", "round_robin", "epochs")


def task_probabilities(
    sizes: dict[str, int],
    strategy: str,
    temperature: float = 1.0,
    epochs: dict[str, float] | None = None,
) -> dict[str, float]:
    """p_t ∝ n_t (proportional), p_t ∝ n_t^(1/T) (temperature; T=1 proportional, T→∞ uniform), uniform
    (round_robin), or p_t ∝ epochs_t · n_t (epochs: a run of Σ epochs_t · n_t / batch micro-batches passes
    over every task its own number of times — the budget of training each task alone)."""
    if strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; strategies: {list(SAMPLING_STRATEGIES)}")
    names = sorted(sizes)
    if strategy == "round_robin":
        return {name: 1 / len(names) for name in names}
    exponent = 1.0 / temperature if strategy == "temperature" else 1.0
    mass = np.array([sizes[name] for name in names], dtype=np.float64) ** exponent
    if strategy == "epochs":
        mass *= np.array([(epochs or {}).get(name, 1.0) for name in names])
    return dict(zip(names, (mass / mass.sum()).tolist(), strict=True))


class TaskSchedule:
    """The task of micro-batch ``step``: round-robin over sorted task names, or drawn from
    `task_probabilities` with an RNG seeded by (seed, step)."""

    def __init__(
        self,
        sizes: dict[str, int],
        strategy: str,
        *,
        temperature: float = 1.0,
        epochs: dict[str, float] | None = None,
        seed: int = 0,
    ):
        self.names = sorted(sizes)
        self.strategy = strategy
        self.seed = seed
        probabilities = task_probabilities(sizes, strategy, temperature, epochs)
        self.probabilities = np.array([probabilities[name] for name in self.names])

    def task_at(self, step: int) -> str:
        if self.strategy == "round_robin":
            return self.names[step % len(self.names)]
        rng = np.random.default_rng([self.seed, step])
        return self.names[int(rng.choice(len(self.names), p=self.probabilities))]


class ShardedExampleOrder:
    """This rank's micro-batches of one task's examples, epoch after epoch.

    Each epoch is a permutation seeded by (seed, task index, epoch), identical on every rank, cut into global
    batches of ``micro_batch_size * world_size``; rank r takes rows ``[r*B, (r+1)*B)`` of each. The last
    incomplete global batch of an epoch is dropped so every rank has the same number of micro-batches.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        task_index: int,
    ):
        self.global_batch = micro_batch_size * world_size
        if num_examples < self.global_batch:
            raise ValueError(
                f"{num_examples} training examples cannot fill one global batch of {self.global_batch} "
                f"(micro_batch_size {micro_batch_size} x {world_size} ranks): lower the micro-batch size"
            )
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.seed = seed
        self.task_index = task_index
        self.epoch = 0
        self.position = 0  # global batches already taken in this epoch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def next_indices(self) -> list[int]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = self._epoch_order(self.epoch)
        start = self.position * self.global_batch + self.rank * self.micro_batch_size
        self.position += 1
        return order[start : start + self.micro_batch_size].tolist()

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation, drawn once and reused by all of that epoch's batches."""
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, self.task_index, epoch]).permutation(
                self.num_examples
            )
            self._order_epoch = epoch
        return self._order

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class MultiTaskBatches(Iterator[dict[str, Any]]):
    """Endless micro-batches: the schedule picks the task, the task's order picks this rank's rows,
    the collator pads them. ``state_dict`` records the position for exact resume."""

    def __init__(
        self,
        datasets: dict[str, Any],
        schedule: TaskSchedule,
        orders: dict[str, ShardedExampleOrder],
        collate,
    ):
        self.datasets = datasets
        self.schedule = schedule
        self.orders = orders
        self.collate = collate
        self.step = 0

    def __next__(self) -> dict[str, Any]:
        task = self.schedule.task_at(self.step)
        self.step += 1
        rows = self.datasets[task].select(self.orders[task].next_indices())
        return self.collate(list(rows), task=task)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "orders": {task: order.state_dict() for task, order in self.orders.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        for task, order_state in state["orders"].items():
            self.orders[task].load_state_dict(order_state)


def build_batches(
    datasets: dict[str, Any],
    collate,
    *,
    strategy: str,
    temperature: float,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epochs: dict[str, float] | None = None,
) -> MultiTaskBatches:
    """The training stream over ``datasets`` (task name -> tokenized train split)."""
    sizes = {task: len(dataset) for task, dataset in datasets.items()}
    orders = {
        task: ShardedExampleOrder(
            sizes[task],
            micro_batch_size=micro_batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            task_index=i,
        )
        for i, task in enumerate(sorted(sizes))
    }
    return MultiTaskBatches(
        datasets,
        TaskSchedule(sizes, strategy, temperature=temperature, epochs=epochs, seed=seed),
        orders,
        collate,
    )
