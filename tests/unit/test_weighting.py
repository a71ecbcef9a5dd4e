"""Loss weighting strategies on known losses."""

import math

import pytest
import torch

from megamoe.tasks.weighting import (
    DynamicWeightAverage,
    StaticWeighting,
    UncertaintyWeighting,
    build_weighting,
)
from tests.conftest import DeviceReads

TASKS = ["topic", "ner"]


def test_static_scales_each_task_by_its_alpha_alone():
    """Not divided by the number of tasks: at α = 1 a task's micro-batch has its single-task loss."""
    weighting = StaticWeighting(TASKS, {"ner": 2.0})
    assert weighting("ner", torch.tensor(3.0)).item() == pytest.approx(2.0 * 3.0)
    assert weighting("topic", torch.tensor(3.0)).item() == pytest.approx(3.0)
    assert weighting.current_weights() == {"ner": 2.0, "topic": 1.0}


def test_uncertainty_loss_and_gradient_match_the_closed_form():
    weighting = UncertaintyWeighting(TASKS)
    with torch.no_grad():
        weighting.log_variances[weighting.index("ner")] = 0.7
    loss = weighting("ner", torch.tensor(2.0))
    assert loss.item() == pytest.approx(2.0 / (2 * math.exp(0.7)) + 0.35)
    loss.backward()
    # d/ds [L e^{-s} / 2 + s / 2] = -L e^{-s} / 2 + 1/2
    assert weighting.log_variances.grad[weighting.index("ner")].item() == pytest.approx(
        -2.0 * math.exp(-0.7) / 2 + 0.5, abs=1e-6
    )
    assert weighting.current_weights()["ner"] == pytest.approx(0.5 * math.exp(-0.7))


def test_dwa_weights_after_two_windows():
    weighting = DynamicWeightAverage(TASKS, window_steps=2, temperature=2.0)
    weighting.train()
    # window 1: topic 2.0, ner 1.0; window 2: topic 1.0, ner 1.0
    for task, loss in [("topic", 2.0), ("ner", 1.0)]:
        weighting(task, torch.tensor(loss))
    assert weighting.current_weights() == {"ner": 1.0, "topic": 1.0}, (
        "weights are 1 until two windows are done"
    )
    for task, loss in [("topic", 1.0), ("ner", 1.0)]:
        weighting(task, torch.tensor(loss))
    # r_topic = 1/2, r_ner = 1/1 -> w = 2 * softmax([0.5, 1] / 2) over (ner, topic) sorted
    e_ner, e_topic = math.exp(1.0 / 2), math.exp(0.5 / 2)
    weights = weighting.current_weights()
    assert weights["ner"] == pytest.approx(2 * e_ner / (e_ner + e_topic), rel=1e-6)
    assert weights["topic"] == pytest.approx(2 * e_topic / (e_ner + e_topic), rel=1e-6)
    assert weighting("topic", torch.tensor(1.0)).item() == pytest.approx(weights["topic"], rel=1e-6)


def test_dwa_backpropagates_through_the_micro_batch_that_updates_its_weights():
    """The micro-batch closing the second window changes the weights in place inside its own forward; its
    backward must still see the weight it was scaled by (a training run crashed there at step 200)."""
    weighting = DynamicWeightAverage(TASKS, window_steps=2)
    weighting.train()
    gradients = []
    for task, value in [("topic", 2.0), ("ner", 1.0), ("topic", 1.0), ("ner", 1.0), ("topic", 1.0)]:
        loss = torch.tensor(value, requires_grad=True)
        weight_used = weighting.current_weights()[task]
        weighting(task, loss).backward()
        gradients.append((loss.grad.item(), weight_used))
    assert weighting.current_weights()["topic"] < 1.0, "the weights moved after the second window"
    for gradient, expected in gradients:
        assert gradient == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_dwa_leaves_a_non_finite_loss_out_of_its_windows(bad):
    """A skipped step's NaN/inf loss would otherwise be in every later ratio: the weights would stay NaN."""
    clean, poisoned = DynamicWeightAverage(TASKS, window_steps=3), DynamicWeightAverage(TASKS, window_steps=3)
    clean.train(), poisoned.train()
    losses = [("topic", 2.0), ("ner", 1.0), ("topic", 1.0), ("ner", 1.5), ("topic", 0.5), ("ner", 2.0)]
    for task, loss in losses:
        clean(task, torch.tensor(loss))
    for index, (task, loss) in enumerate(losses):
        # topic's second micro-batch is bad: its window mean is over the first one alone
        poisoned(task, torch.tensor(bad if index == 2 else loss))
    weights = poisoned.current_weights()
    assert all(math.isfinite(weight) for weight in weights.values()), weights
    assert poisoned.previous_means[1].tolist() == [1.0, 2.0], "window 1 (ner, topic): topic's 2.0 alone"
    assert clean.previous_means[1].tolist() == [1.0, 1.5]
    assert poisoned.previous_means[0].tolist() == clean.previous_means[0].tolist()


def test_dwa_state_round_trips():
    weighting = DynamicWeightAverage(TASKS, window_steps=2)
    weighting.train()
    for task, loss in [("topic", 2.0), ("ner", 1.0), ("topic", 1.0), ("ner", 3.0), ("topic", 5.0)]:
        weighting(task, torch.tensor(loss))
    restored = DynamicWeightAverage(TASKS, window_steps=2)
    restored.load_state_dict(weighting.state_dict())
    assert restored.current_weights() == weighting.current_weights()
    assert torch.equal(restored.window_sums, weighting.window_sums)


def test_unknown_strategy():
    with pytest.raises(
        ValueError, match=r"unknown loss weighting 'gradnorm'; strategies: \['static', 'uncertainty', 'dwa'\]"
    ):
        build_weighting("gradnorm", TASKS)


def test_dwa_reads_the_device_only_when_a_window_ends():
    """Whether a window ends is counted on the host: no sync per micro-batch on a GPU."""
    weighting = DynamicWeightAverage(TASKS, window_steps=3)
    weighting.train()
    for name, buffer in list(weighting.named_buffers()):
        setattr(weighting, name, buffer.as_subclass(DeviceReads))
    reads_per_step = []
    for task, loss in [("topic", 2.0), ("ner", 1.0), ("topic", 1.0), ("ner", 3.0), ("topic", 5.0)]:
        DeviceReads.reads.clear()
        weighting(task, torch.tensor(loss).as_subclass(DeviceReads))
        reads_per_step.append(len(DeviceReads.reads))
    assert reads_per_step == [0, 0, 1, 0, 0], "one read (windows done) at the end of the 3-step window"
    # Resumed from a checkpoint in mid-window, the host count starts from the loaded buffer.
    restored = DynamicWeightAverage(TASKS, window_steps=3)
    restored.train()
    restored.load_state_dict(weighting.state_dict())
    restored("ner", torch.tensor(1.0))
    assert int(restored.steps_in_window) == 0 and int(restored.windows_done) == 2, "step 6 ended window 2"
