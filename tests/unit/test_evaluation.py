"""Sharded evaluation: every rank runs the same forwards, the gathered predictions are the whole split's."""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict

from megamoe.data.collate import MultiTaskCollator
from megamoe.data.pipeline import TaskData
from megamoe.model import RouterStats
from megamoe.tasks.evaluation import EvalShard, shard_results, task_metrics
from megamoe.tasks.metrics import ExpertUtilization

LABELS = ["O", "B-PER", "I-PER"]


def tasks(num_examples: int) -> dict[str, TaskData]:
    ids = [[1 + (i * 7 + j) % 11 for j in range(3 + i % 4)] for i in range(num_examples)]
    topic = Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(r) for r in ids],
            "labels": [i % 3 for i in range(num_examples)],
        }
    )
    words = [[f"w{j}" for j in range(len(r))] for r in ids]
    ner = Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(r) for r in ids],
            "word_ids": [list(range(len(r))) for r in ids],
            "tokens": words,
            "tags": [[LABELS[(i + j) % 3] for j in range(len(r))] for i, r in enumerate(ids)],
        }
    )
    return {
        "topic": TaskData("topic", "sequence_classification", ["a", "b", "c"], DatasetDict(test=topic)),
        "ner": TaskData("ner", "token_classification", LABELS, DatasetDict(test=ner)),
    }


class CountingForward:
    """Logits that depend only on each row's tokens (argmax = token id mod C), plus router stats."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        ids = batch["input_ids"]
        per_token = torch.nn.functional.one_hot(ids % 3, 3).float()
        logits = per_token if batch["task"] == "ner" else per_token[:, 0]
        load = torch.bincount(ids[batch["attention_mask"].bool()] % 4, minlength=4)
        stats = RouterStats(1, torch.tensor(0.0), torch.tensor(0.0), load, torch.tensor(0))
        return SimpleNamespace(logits=logits, router_stats=[stats])


@pytest.mark.parametrize("num_examples", [7, 8, 1])
@pytest.mark.parametrize("task", ["topic", "ner"])
def test_two_shards_gather_to_what_one_process_computes(num_examples, task):
    data = tasks(num_examples)[task]
    collate = MultiTaskCollator(pad_token_id=0)

    def run(shard):
        forward, utilization = CountingForward(), ExpertUtilization()
        results = shard_results(
            forward, data, "test", collate, batch_size=2, utilization=utilization, shard=shard
        )
        return results, forward.calls, utilization

    whole, _, whole_load = run(EvalShard())
    (rank0, calls0, load0), (rank1, calls1, load1) = run(EvalShard(0, 2)), run(EvalShard(1, 2))
    largest_shard = math.ceil(num_examples / 2)
    assert calls0 == calls1 == math.ceil(largest_shard / 2), "lockstep: the same number of forwards"
    assert sorted(r[0] for r in rank0 + rank1) == list(range(num_examples)), "each example exactly once"
    assert task_metrics(data, rank1 + rank0) == task_metrics(data, whole)
    assert ExpertUtilization().merged([load0.counts, load1.counts]).fractions() == whole_load.fractions()


def test_a_batch_pads_only_to_its_own_rows_longest_first():
    """Rows of mixed lengths in split order: the forwards see them longest first, so each batch of 2 pads to
    its own longest row, and the predictions are still each example's own."""
    data = tasks(8)["ner"]  # row i has 3 + i % 4 tokens: 3, 4, 5, 6, 3, 4, 5, 6
    widths = []

    def forward(batch):
        widths.append(batch["input_ids"].shape[1])
        return CountingForward()(batch)

    results = shard_results(
        forward,
        data,
        "test",
        MultiTaskCollator(pad_token_id=0),
        batch_size=2,
        utilization=ExpertUtilization(),
        shard=EvalShard(),
    )
    assert widths == [6, 5, 4, 3], "split order would pad to 4, 6, 4, 6"
    lengths = [len(ids) for ids in data.splits["test"]["input_ids"]]
    assert [index for index, *_ in results] == sorted(range(8), key=lambda i: -lengths[i])
    for index, prediction, reference in results:
        assert len(prediction) == len(reference) == lengths[index]
