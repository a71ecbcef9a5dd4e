"""Metrics against hand-computed values."""

import json
import os
import stat

import pytest
import torch

from megamoe.model import RouterStats
from megamoe.run_dir import write_json_atomic
from megamoe.tasks.metrics import (
    ExpertUtilization,
    classification_metrics,
    format_metrics_table,
    ner_metrics,
    regression_metrics,
)


def test_classification():
    metrics = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2], num_labels=3)
    # per label F1: 0 -> 1.0; 1 -> 2*1/(2+1+0) = 2/3; 2 -> 2*1/(2+0+1) = 2/3
    assert metrics == {"accuracy": 0.75, "macro_f1": pytest.approx((1 + 2 / 3 + 2 / 3) / 3)}


def test_ner_is_strict_iob2():
    references = [["B-PER", "I-PER", "O", "B-LOC"]]
    predictions = [["B-PER", "I-LOC", "O", "B-LOC"]]  # the PER span is broken: only LOC counts
    metrics = ner_metrics(predictions, references)
    assert metrics["precision"] == pytest.approx(1 / 2) and metrics["recall"] == pytest.approx(1 / 2)
    assert metrics["f1_LOC"] == 1.0 and metrics["f1_PER"] == 0.0
    assert ner_metrics([["I-PER", "O"]], [["B-PER", "O"]])["f1"] == 0.0, "strict: I- without B- is no entity"


def test_regression():
    metrics = regression_metrics([1.0, 2.0, 3.0], [1.5, 2.0, 2.5])
    assert metrics["mae"] == pytest.approx(1 / 3)
    assert metrics["pearson"] == pytest.approx(1.0)


def test_expert_utilization_per_task():
    utilization = ExpertUtilization()

    def stats(layer, counts):
        return RouterStats(layer, torch.tensor(0.0), torch.tensor(0.0), torch.tensor(counts), torch.tensor(0))

    utilization.update("ner", [stats(1, [6, 2, 0, 0]), stats(3, [2, 2, 2, 2])])
    utilization.update("ner", [stats(1, [0, 0, 0, 8]), stats(3, [2, 2, 2, 2])])
    utilization.update("topic", [stats(1, [1, 1, 1, 1])])
    fractions = utilization.fractions()
    assert fractions["ner"][1] == [6 / 16, 2 / 16, 0.0, 8 / 16]
    assert fractions["ner"][3] == [0.25] * 4
    assert utilization.imbalance()["ner"][1] == pytest.approx(0.5 / 0.25)
    assert utilization.imbalance()["topic"][1] == 1.0


def test_table_and_atomic_json(tmp_path):
    metrics = {"ner": {"test": {"f1": 0.5, "f1_PER": 1.0}}, "topic": {"test": {"accuracy": 0.9}}}
    table = format_metrics_table(metrics).splitlines()
    assert table[0].split() == ["task", "split", "metric", "value"]
    assert table[1].split() == ["ner", "test", "f1", "0.5000"] and len(table) == 3
    write_json_atomic(tmp_path / "run" / "metrics.json", metrics)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_follow_the_umask_like_any_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "metrics.json", {"a": 1})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask
