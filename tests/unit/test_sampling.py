"""Task schedule and data-parallel sharding: same tasks on every rank, disjoint examples, exact resume."""

import functools
import operator

import pytest

from megamoe.data.sampling import (
    MultiTaskBatches,
    ShardedExampleOrder,
    TaskSchedule,
    build_batches,
    task_probabilities,
)

SIZES = {"topic": 1700, "ner": 1836, "sentiment": 10722}


def test_probabilities():
    proportional = task_probabilities(SIZES, "proportional")
    assert proportional["sentiment"] == pytest.approx(10722 / 14258)
    tempered = task_probabilities(SIZES, "temperature", temperature=2.0)
    total = sum(n**0.5 for n in SIZES.values())
    assert tempered["topic"] == pytest.approx(1700**0.5 / total)
    assert task_probabilities(SIZES, "temperature", temperature=1.0) == pytest.approx(proportional)
    assert task_probabilities(SIZES, "round_robin") == pytest.approx(dict.fromkeys(SIZES, 1 / 3))
    with pytest.raises(ValueError, match="unknown sampling strategy 'uniform'"):
        task_probabilities(SIZES, "uniform")


def test_epochs_sampling_gives_every_task_its_own_budget():
    """NER 3 epochs, the others 1 (DESIGN.md's single-task budgets): steps ∝ epochs x size."""
    epochs = {"topic": 1.0, "ner": 3.0, "sentiment": 1.0}
    probabilities = task_probabilities(SIZES, "epochs", epochs=epochs)
    budget = {task: epochs[task] * SIZES[task] for task in SIZES}
    for task in SIZES:
        assert probabilities[task] == pytest.approx(budget[task] / sum(budget.values()))
    assert task_probabilities(SIZES, "epochs") == pytest.approx(task_probabilities(SIZES, "proportional"))
    schedule = TaskSchedule(SIZES, "epochs", epochs=epochs, seed=0)
    steps = round(sum(budget.values()) / 16)
    ner_steps = sum(schedule.task_at(step) == "ner" for step in range(steps))
    assert ner_steps == pytest.approx(3 * SIZES["ner"] / 16, rel=0.1)


def test_schedule_frequencies_match_the_probabilities():
    schedule = TaskSchedule(SIZES, "temperature", temperature=2.0, seed=3)
    draws = [schedule.task_at(step) for step in range(20000)]
    for task, p in task_probabilities(SIZES, "temperature", temperature=2.0).items():
        assert draws.count(task) / len(draws) == pytest.approx(p, abs=0.015)


def test_schedule_is_a_pure_function_of_seed_and_step():
    a = TaskSchedule(SIZES, "proportional", seed=1)
    b = TaskSchedule(dict(reversed(SIZES.items())), "proportional", seed=1)  # dict order must not matter
    assert [a.task_at(s) for s in range(200)] == [b.task_at(s) for s in range(200)]
    assert [a.task_at(s) for s in range(200)] != [
        TaskSchedule(SIZES, "proportional", seed=2).task_at(s) for s in range(200)
    ]
    assert [TaskSchedule(SIZES, "round_robin").task_at(s) for s in range(4)] == [
        "ner",
        "sentiment",
        "topic",
        "ner",
    ]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_get_disjoint_shards_that_cover_the_epoch(world_size):
    orders = [
        ShardedExampleOrder(103, micro_batch_size=5, rank=r, world_size=world_size, seed=0, task_index=1)
        for r in range(world_size)
    ]
    per_epoch = orders[0].batches_per_epoch
    assert per_epoch == 103 // (5 * world_size)
    seen = [
        functools.reduce(operator.iadd, (order.next_indices() for _ in range(per_epoch)), [])
        for order in orders
    ]
    flat = [i for rank_rows in seen for i in rank_rows]
    assert len(flat) == len(set(flat)) == per_epoch * 5 * world_size, "disjoint across ranks"
    next_epoch = orders[0].next_indices()
    assert orders[0].epoch == 1 and next_epoch != seen[0][:5], "reshuffled next epoch"


def test_too_small_for_a_global_batch():
    with pytest.raises(ValueError, match="cannot fill one global batch of 32"):
        ShardedExampleOrder(20, micro_batch_size=16, rank=0, world_size=2, seed=0, task_index=0)


def fake_collate(rows, task):
    return {"task": task, "rows": rows}


def test_stream_is_lockstep_across_ranks_and_resumes_exactly():
    datasets = {name: [{"id": f"{name}{i}"} for i in range(n // 100)] for name, n in SIZES.items()}

    class Selectable(list):
        def select(self, indices):
            return [self[i] for i in indices]

    datasets = {k: Selectable(v) for k, v in datasets.items()}
    streams = [
        build_batches(
            datasets,
            fake_collate,
            strategy="temperature",
            temperature=2.0,
            micro_batch_size=2,
            rank=r,
            world_size=2,
            seed=7,
        )
        for r in range(2)
    ]
    batches = [[next(s) for _ in range(30)] for s in streams]
    assert [b["task"] for b in batches[0]] == [b["task"] for b in batches[1]]
    for b0, b1 in zip(*batches, strict=True):
        assert not {r["id"] for r in b0["rows"]} & {r["id"] for r in b1["rows"]}

    state = streams[0].state_dict()
    expected = [next(streams[0]) for _ in range(10)]
    resumed: MultiTaskBatches = build_batches(
        datasets,
        fake_collate,
        strategy="temperature",
        temperature=2.0,
        micro_batch_size=2,
        rank=0,
        world_size=2,
        seed=7,
    )
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(10)] == expected
