"""The DeepSpeed engine and the trainer, in one process (gloo, CPU): a tiny model learns three tasks."""

import itertools
import json
import math
import re

import pytest
import torch
from transformers import AutoConfig

from megamoe import MegaMoEConfig, MegaMoEForMultiTask
from megamoe.config import ParallelSection, TrainSection
from megamoe.engine.callbacks import TrainerCallback
from megamoe.engine.deepspeed_engine import (
    Engine,
    TopologyError,
    check_topology,
    deepspeed_config,
    merge_user_deepspeed_config,
    parameter_groups,
    user_deepspeed_config_path,
)
from megamoe.engine.trainer import Trainer, TrainingDivergedError
from tests.conftest import DeviceReads, tiny_config


def synthetic_batches(seed=0):
    """Learnable toy tasks: topic = first token's bucket, sentiment = first token below 32, ner = token bucket."""
    generator = torch.Generator().manual_seed(seed)
    for task in itertools.cycle(["topic", "ner", "sentiment"]):
        ids = torch.randint(1, 64, (8, 10), generator=generator)
        mask = torch.ones_like(ids)
        if task == "topic":
            labels = ids[:, 0] % 3
        elif task == "sentiment":
            labels = (ids[:, 0] < 32).long()
        else:
            labels = ids % 5
        yield {"task": task, "input_ids": ids, "attention_mask": mask, "labels": labels}


def test_deepspeed_config_follows_the_run_config():
    train = TrainSection(
        max_steps=200,
        micro_batch_size=8,
        gradient_accumulation_steps=2,
        lr=3e-4,
        warmup_ratio=0.1,
        precision="bf16",
    )
    config = deepspeed_config(train, ParallelSection(zero_stage=1))
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 2
    assert config["scheduler"]["params"] == {
        "total_num_steps": 200,
        "warmup_num_steps": 20,
        "warmup_max_lr": 3e-4,
        "warmup_min_lr": 0.0,
        "warmup_type": "linear",
    }
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["zero_optimization"]["stage"] == 1


def test_no_weight_decay_on_biases_and_norms():
    model = MegaMoEForMultiTask(tiny_config())
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("bias", "norm.weight")) for p in no_decay["params"])
    assert any(names[id(p)].endswith("experts.gate_up_proj") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_heads_step_at_head_lr_and_the_body_at_lr(zero_stage):
    """AdamW's step on a gradient it has seen every step before (the same batch, those steps at warmup's rate
    0) moves each weight by rate * g / (|g| + eps): the largest move of every parameter is its group's rate.
    The uncertainty weighting's log-variances start from scratch too: at the heads' rate."""
    import deepspeed

    from megamoe.tasks.objective import MultiTaskObjective
    from megamoe.tasks.weighting import build_weighting

    torch.manual_seed(0)
    model = MegaMoEForMultiTask(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    objective = MultiTaskObjective(model, build_weighting("uncertainty", list(model.config.tasks)))
    train = TrainSection(max_steps=10, micro_batch_size=8, lr=1e-3, head_lr=2e-2, weight_decay=0.0)
    train.max_grad_norm = train.warmup_ratio = 0.0
    config = deepspeed_config(train, ParallelSection(zero_stage=zero_stage))
    config["optimizer"]["params"]["eps"] = 1e-20  # the tiny attention's gradients are ~1e-7: eps would show
    flat_peak = json.loads(json.dumps(config))
    flat_peak["scheduler"]["params"]["warmup_max_lr"] = train.lr  # every group to the body's rate
    with pytest.raises(ValueError, match="head_lr needs a scheduler that keeps each group's peak"):
        Engine(objective, flat_peak, head_lr=train.head_lr)
    engine = Engine(objective, config, head_lr=train.head_lr)
    with deepspeed.zero.GatheredParameters(list(objective.parameters())):  # ZeRO-3 holds partitions
        before = {name: param.detach().clone() for name, param in objective.named_parameters()}
    batch = next(synthetic_batches())  # topic: its head and the body get gradients, the other heads none
    while engine.lr == 0.0:  # DeepSpeed's WarmupLR starts at its minimum, 0 here
        engine.train_step(batch)
    rate = engine.lr  # the body's, for the next step
    engine.train_step(batch)
    with deepspeed.zero.GatheredParameters(list(objective.parameters())):
        moves = {
            name: (param - before[name]).abs().max().item() for name, param in objective.named_parameters()
        }
    fresh = ("model.heads.", "weighting.")
    rates = {name: rate * (20 if name.startswith(fresh) else 1) for name in moves if moves[name] > 0}
    assert {name for name in rates if name.startswith(fresh)} == {
        f"model.heads.topic.{layer}.{param}"
        for layer in ("dense", "out_proj")
        for param in ("weight", "bias")
    } | {"weighting.log_variances"}
    assert {name: moves[name] for name in rates} == pytest.approx(rates, rel=1e-3)


def assert_every_task_learned(history) -> None:
    for task in ("topic", "ner", "sentiment"):
        losses = [r.task_loss for r in history if r.task == task]
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < 0.8 * first, f"{task}: loss {first:.3f} -> {last:.3f}"


def test_a_tiny_model_learns_every_task(tmp_path):
    torch.manual_seed(0)
    model = MegaMoEForMultiTask(tiny_config())
    train = TrainSection(max_steps=150, micro_batch_size=8, lr=3e-3, warmup_ratio=0.1, weight_decay=0.0)
    engine = Engine(model, deepspeed_config(train), config_file=tmp_path / "deepspeed_config.json")
    assert json.loads((tmp_path / "deepspeed_config.json").read_text())["optimizer"]["type"] == "AdamW"
    history = Trainer(engine, synthetic_batches(), max_steps=train.max_steps, show_progress=False).fit()
    assert len(history) == 150 and history[-1].step == 150
    assert history[5].lr > 0 and history[-1].lr < history[10].lr, "warmup then linear decay"
    assert_every_task_learned(history)
    assert all(r.aux_loss > 0 and r.tokens == 80 for r in history)


FEATURE_RUNS = [
    ("offload_optimizer", {}, {}, {"offload_optimizer": True}, "static"),
    ("bf16", {}, {"precision": "bf16"}, {}, "static"),
    ("gradient accumulation 2", {}, {"gradient_accumulation_steps": 2}, {}, "static"),
    ("capacity with drops", {"capacity_factor": 1.0}, {}, {}, "static"),
    ("shared experts", {"num_shared_experts": 1}, {}, {}, "static"),
    ("task-aware routing", {"task_aware_routing": True}, {}, {}, "static"),
    ("uncertainty weighting", {}, {}, {}, "uncertainty"),
    ("dwa weighting", {}, {}, {}, "dwa"),
    ("ZeRO-3", {}, {}, {"zero_stage": 3}, "static"),
]


@pytest.mark.parametrize(
    ("feature", "model_args", "train_args", "parallel_args", "weighting"),
    FEATURE_RUNS,
    ids=[run[0] for run in FEATURE_RUNS],
)
def test_each_training_feature_still_learns_every_task(
    feature, model_args, train_args, parallel_args, weighting
):
    """One short run per feature that otherwise only a config test covers: through the engine, every task's
    loss must fall, and the feature must have acted."""
    from megamoe.tasks.objective import MultiTaskObjective
    from megamoe.tasks.weighting import DynamicWeightAverage, build_weighting

    torch.manual_seed(0)
    model = MegaMoEForMultiTask(tiny_config(**model_args))
    tasks = list(model.config.tasks)
    # DWA in windows of 50 micro-batches: its weights first move after the second window, inside the run.
    objective = MultiTaskObjective(
        model,
        DynamicWeightAverage(tasks, window_steps=50)
        if weighting == "dwa"
        else build_weighting(weighting, tasks),
    )
    train = TrainSection(
        **{
            "max_steps": 150,
            "micro_batch_size": 8,
            "lr": 3e-3,
            "warmup_ratio": 0.1,
            "weight_decay": 0.0,
            **train_args,
        }
    )
    engine = Engine(objective, deepspeed_config(train, ParallelSection(**parallel_args)))
    trainer = Trainer(
        engine,
        synthetic_batches(),
        max_steps=train.max_steps,
        grad_accum=train.gradient_accumulation_steps,
        task_weights=objective.weighting.current_weights,
        log_every=50,
        show_progress=False,
    )
    history = trainer.fit()
    assert len(history) == 150 * train.gradient_accumulation_steps and not trainer.skipped_steps
    assert_every_task_learned(history)
    acted = {
        "offload_optimizer": lambda: (
            type(engine.engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
            and engine.engine.zero_cpu_offload()
        ),
        "bf16": lambda: {p.dtype for p in engine.engine.module.parameters()} == {torch.bfloat16},
        "gradient accumulation 2": lambda: engine.engine.global_steps == 150,
        "capacity with drops": lambda: sum(r.dropped_tokens for r in history) > 0,
        "shared experts": lambda: model.model.layers[0].mlp.shared_experts is not None,
        "task-aware routing": lambda: model.model.layers[0].mlp.router.task_logit_bias.abs().sum() > 0,
        "uncertainty weighting": lambda: len(set(history[-1].task_weights.values())) == 3,
        "dwa weighting": lambda: len(set(history[-1].task_weights.values())) == 3,
        "ZeRO-3": lambda: all(hasattr(p, "ds_id") for p in engine.engine.module.parameters()),
    }[feature]
    assert acted(), f"{feature} did not act"


def fit_tiny(batches, *, max_steps=150, callbacks=lambda engine: [], **model_args):
    """150 steps of the tiny model on ``batches`` through the engine (ZeRO-0, fp32), as the feature runs train;
    ``callbacks(engine)`` are the trainer's."""
    torch.manual_seed(0)
    model = MegaMoEForMultiTask(tiny_config(**model_args))
    train = TrainSection(max_steps=max_steps, micro_batch_size=8, lr=3e-3, warmup_ratio=0.1, weight_decay=0.0)
    engine = Engine(model, deepspeed_config(train))
    trainer = Trainer(engine, batches, max_steps=max_steps, callbacks=callbacks(engine), show_progress=False)
    return engine, trainer, trainer.fit()


def test_temperature_sampling_still_learns_every_task_at_its_tempered_share():
    """Tasks of 640, 160 and 40 examples through the real sampler (p ~ n^(1/T), T = 2): the small task gets
    a fair share of steps (not its 5 % by size), and every task still learns."""
    from datasets import Dataset

    from megamoe.data.collate import MultiTaskCollator
    from megamoe.data.sampling import build_batches, task_probabilities

    sizes = {"topic": 640, "ner": 160, "sentiment": 40}
    rows = synthetic_batches()
    datasets = {task: [] for task in sizes}
    while any(len(datasets[task]) < size for task, size in sizes.items()):
        batch = next(rows)
        for i in range(len(batch["input_ids"])):
            row = {
                "input_ids": batch["input_ids"][i].tolist(),
                "attention_mask": batch["attention_mask"][i].tolist(),
            }
            row["labels"] = batch["labels"][i].tolist()
            datasets[batch["task"]].append(row)
    datasets = {task: Dataset.from_list(datasets[task][:size]) for task, size in sizes.items()}
    batches = build_batches(
        datasets,
        MultiTaskCollator(pad_token_id=0),
        strategy="temperature",
        temperature=2.0,
        micro_batch_size=8,
        rank=0,
        world_size=1,
        seed=0,
    )
    _, _, history = fit_tiny(batches)
    assert_every_task_learned(history)
    expected = task_probabilities(sizes, "temperature", temperature=2.0)  # 0.57, 0.29, 0.14
    for task, probability in expected.items():
        share = sum(r.task == task for r in history) / len(history)
        assert share == pytest.approx(probability, abs=0.08), f"{task}: {share:.2f} of steps"


def test_evaluating_every_n_steps_leaves_training_exactly_as_it_was():
    """eval_every's evaluations (eval mode, no grad) must not change a single training loss: not the
    dropout RNG stream, not the train/eval mode, not a gradient. And they see the model learn."""
    from megamoe.engine.callbacks import EvaluationCallback

    held_out = list(itertools.islice(synthetic_batches(seed=1), 12))  # 4 batches per task

    def accuracy(engine: Engine) -> dict[str, float]:
        correct = {task: [] for task in ("topic", "ner", "sentiment")}
        for batch in held_out:
            predictions = engine.eval_forward(batch).logits.argmax(-1)
            correct[batch["task"]].append((predictions == batch["labels"]).float().mean())
        return {task: float(torch.stack(values).mean()) for task, values in correct.items()}

    def evaluated(engine: Engine) -> list[EvaluationCallback]:
        return [EvaluationCallback(lambda step: accuracy(engine), every=50)]

    dropout = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    _, trainer, history = fit_tiny(synthetic_batches(), callbacks=evaluated, **dropout)
    _, _, plain = fit_tiny(synthetic_batches(), **dropout)
    assert [r.task_loss for r in history] == [r.task_loss for r in plain]
    assert [e["step"] for e in trainer.evaluations] == [50, 100]
    chance = {"topic": 1 / 3, "ner": 1 / 5, "sentiment": 1 / 2}
    for task, level in chance.items():
        assert trainer.evaluations[-1][task] > level + 0.2, trainer.evaluations


@pytest.mark.parametrize(
    ("train", "parallel", "world_size", "num_experts", "message"),
    [
        ({}, {"expert_parallel_size": 3}, 3, 8, "expert_parallel_size=3 does not divide num_experts=8"),
        ({}, {"expert_parallel_size": 2}, 3, 8, "does not divide the 3 launched ranks"),
        ({}, {"expert_parallel_size": 2}, 2, None, "the model has no MoE layers"),
        (
            {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "global_batch_size": 32},
            {},
            2,
            8,
            "train.global_batch_size=32 but micro_batch_size 4 x gradient_accumulation_steps 2 x 2 ranks = 16",
        ),
    ],
)
def test_topology_errors_say_what_to_change(train, parallel, world_size, num_experts, message):
    with pytest.raises(TopologyError, match=re.escape(message)):
        check_topology(
            TrainSection(**train),
            ParallelSection(**parallel),
            world_size=world_size,
            model=model_shape(num_experts),
        )


def model_shape(num_experts: int | None, **kwargs) -> MegaMoEConfig:
    moe = {"num_experts": num_experts} if num_experts else {"moe_layer_freq": 0}
    return MegaMoEConfig(**moe, **kwargs)


def test_a_topology_that_fits_passes():
    train = TrainSection(micro_batch_size=4, gradient_accumulation_steps=2, global_batch_size=32)
    check_topology(train, ParallelSection(expert_parallel_size=2), world_size=4, model=model_shape(8))


def test_zero3_with_expert_parallelism_is_for_hf_moe_backbones_only():
    parallel = ParallelSection(zero_stage=3, expert_parallel_size=2)
    with pytest.raises(TopologyError, match="not available for MegaMoE's own experts"):
        check_topology(TrainSection(), parallel, world_size=2, model=model_shape(8))
    backbone = AutoConfig.for_model("qwen3_moe", num_experts=8, num_experts_per_tok=2).to_dict()
    check_topology(
        TrainSection(),
        parallel,
        world_size=2,
        model=model_shape(8, backbone=backbone, classifier_pooling="last"),
    )


def test_deepspeed_config_offloads_the_optimizer_when_asked():
    config = deepspeed_config(TrainSection(), ParallelSection(zero_stage=2, offload_optimizer=True))
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_a_user_deepspeed_json_is_merged_when_it_agrees(tmp_path):
    train = TrainSection(micro_batch_size=4)
    user = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "optimizer": {"type": "Adam", "params": {"betas": [0.9, 0.95]}},
    }
    (tmp_path / "ds.json").write_text(json.dumps(user))
    merged = merge_user_deepspeed_config(tmp_path / "ds.json", deepspeed_config(train), world_size=2)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["optimizer"]["type"] == "Adam" and merged["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert merged["optimizer"]["params"]["lr"] == train.lr, "generated keys the JSON leaves out stay"
    # Another optimizer keeps the run's lr and weight decay, not AdamW's own flags (a TypeError in its
    # constructor), and its own params win.
    (tmp_path / "ds.json").write_text(
        json.dumps({"optimizer": {"type": "Lamb", "params": {"max_coeff": 5.0}}})
    )
    merged = merge_user_deepspeed_config(tmp_path / "ds.json", deepspeed_config(train), world_size=2)
    assert merged["optimizer"] == {
        "type": "Lamb",
        "params": {"lr": train.lr, "weight_decay": train.weight_decay, "max_coeff": 5.0},
    }


def test_a_user_deepspeed_json_that_disagrees_is_refused(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 64}))
    with pytest.raises(TopologyError) as err:
        merge_user_deepspeed_config(tmp_path / "ds.json", deepspeed_config(TrainSection()), world_size=2)
    assert "zero_optimization.stage is 3 there but 2 in the run config" in str(err.value)
    assert "train_batch_size is 64 there but 32 here" in str(err.value)
    with pytest.raises(TopologyError, match="no such file"):
        merge_user_deepspeed_config(tmp_path / "missing.json", deepspeed_config(TrainSection()), world_size=1)


def test_a_user_deepspeed_scheduler_must_keep_the_heads_rate(tmp_path):
    generated = deepspeed_config(TrainSection(head_lr=1e-3))
    assert generated["scheduler"]["params"]["warmup_max_lr"] is None, "each group warms up to its own lr"
    for scheduler, kept in (
        ({"params": {"warmup_num_steps": 5}}, True),  # still WarmupDecayLR, to each group's lr
        ({"type": "WarmupCosineLR", "params": {"total_num_steps": 10}}, True),  # scales each group's lr
        ({"params": {"warmup_max_lr": 3e-4}}, False),
        ({"type": "OneCycle", "params": {"cycle_min_lr": 0.0, "cycle_max_lr": 3e-4}}, False),
    ):
        (tmp_path / "ds.json").write_text(json.dumps({"scheduler": scheduler}))
        if kept:
            merged = merge_user_deepspeed_config(tmp_path / "ds.json", generated, world_size=1)
            # A scheduler of another type comes whole: the generated params are for WarmupDecayLR.
            if "type" in scheduler:
                assert merged["scheduler"] == scheduler
        else:
            with pytest.raises(TopologyError, match=re.escape("train.head_lr is set, but the scheduler")):
                merge_user_deepspeed_config(tmp_path / "ds.json", generated, world_size=1)
    # Without train.head_lr any scheduler goes.
    (tmp_path / "ds.json").write_text(json.dumps({"scheduler": {"params": {"warmup_max_lr": 3e-4}}}))
    merged = merge_user_deepspeed_config(tmp_path / "ds.json", deepspeed_config(TrainSection()), world_size=1)
    assert merged["scheduler"]["params"]["warmup_max_lr"] == 3e-4


def test_accelerate_launch_settings_are_honoured_or_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    assert user_deepspeed_config_path(ParallelSection()) == str(tmp_path / "ds.json")
    assert user_deepspeed_config_path(ParallelSection(deepspeed_config="mine.json")) == "mine.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(
        TopologyError, match=r"accelerate launch asked for ZeRO stage 3 but parallel\.zero_stage=2"
    ):
        check_topology(TrainSection(), ParallelSection(zero_stage=2), world_size=1, model=model_shape(8))


def test_run_logger_writes_means_over_the_interval_and_expert_load_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megamoe.engine.run_logger import RunLogger
    from megamoe.engine.trainer import StepRecord
    from megamoe.model import RouterStats

    def record(step, task, task_loss, imbalance, task_weights=None):
        return StepRecord(
            step=step,
            task=task,
            loss=task_loss + 0.1,
            task_loss=task_loss,
            aux_loss=0.1,
            z_loss=0.0,
            lr=1e-4 * step,
            tokens=10,
            task_weights=task_weights or {},
            load_imbalance=[imbalance],
            dropped_tokens=step,
        )

    # Three steps since the last log: the topic step in the middle counts, not only the last step's task.
    records = [
        record(1, "ner", 0.9, 1.5),
        record(2, "topic", 2.0, 1.0),
        record(3, "ner", 0.5, 2.0, {"ner": 0.7}),
    ]
    zero = torch.tensor(0.0)
    stats = RouterStats(0, zero, zero, torch.tensor([3, 0, 1, 0]), torch.tensor(0))
    logger = RunLogger(tmp_path, enabled=True)
    logger.log_step(3, records, tokens_per_s=123.0, router_stats=[stats])
    logger.close()
    RunLogger(tmp_path / "off", enabled=False).log_step(1, records, 1.0)  # rank != 0: nothing
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalar = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}
    assert scalar["task_loss/ner"] == pytest.approx(0.7) and scalar["task_loss/topic"] == pytest.approx(2.0)
    assert scalar["train/loss"] == pytest.approx((1.0 + 2.1 + 0.6) / 3)
    assert scalar["expert_load_imbalance/layer_0"] == pytest.approx(1.5)
    assert scalar["train/dropped_tokens"] == 6 and scalar["train/lr"] == pytest.approx(3e-4)
    assert scalar["task_weight/ner"] == pytest.approx(0.7)
    histogram = events.Histograms("expert_load/layer_0")[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max) == (4, 0, 2), "3 tokens on expert 0, 1 on expert 2"
    assert not (tmp_path / "off").exists()


def test_the_trainer_reads_the_device_once_per_logging_interval_and_records_every_micro_batch():
    from types import SimpleNamespace

    from megamoe.engine.trainer import StepRecord
    from megamoe.model import RouterStats

    def on_device(value):
        return torch.tensor(value).as_subclass(DeviceReads)

    class Engine:
        lr = 0.5
        step_applied = True
        calls = 0

        def train_step(self, batch):
            self.calls += 1
            loss = float(self.calls)
            stats = RouterStats(
                0, on_device(0.0), on_device(0.0), on_device([3, 1]), on_device(self.calls % 2)
            )
            return SimpleNamespace(
                loss=on_device(loss),
                task_loss=on_device(loss - 0.5),
                aux_loss=on_device(0.25),
                z_loss=on_device(0.125),
                router_stats=[stats],
            )

    batches = (
        {"task": "ner" if i % 3 else "topic", "attention_mask": torch.ones(2, 3)} for i in itertools.count()
    )
    reads_by_step = {}

    class CountReads(TrainerCallback):
        def on_step_end(self, trainer, step):
            reads_by_step[step] = len(DeviceReads.reads)
            DeviceReads.reads.clear()

    DeviceReads.reads.clear()
    trainer = Trainer(
        Engine(),
        batches,
        max_steps=7,
        grad_accum=2,
        log_every=3,
        task_weights=lambda: {"ner": 1.0},
        callbacks=[CountReads()],
        show_progress=False,
    )
    history = trainer.fit()
    assert [step for step, reads in reads_by_step.items() if reads] == [3, 6, 7], reads_by_step
    assert max(reads_by_step.values()) <= 2, "one transfer (and its tolist) per interval"
    assert len(history) == 14 and [r.step for r in history] == [1 + i // 2 for i in range(14)]
    assert history[4] == StepRecord(
        step=3,
        task="ner",
        loss=5.0,
        task_loss=4.5,
        aux_loss=0.25,
        z_loss=0.125,
        lr=0.5,
        tokens=6,
        load_imbalance=[1.5],
        dropped_tokens=1,
    )
    assert history[5].task_weights == {"ner": 1.0}, "the loss weights, read with the interval's numbers"


def test_a_checkpoint_between_logs_holds_every_micro_batch_record():
    engine = Engine(MegaMoEForMultiTask(tiny_config()), deepspeed_config(TrainSection(max_steps=4)))
    trainer = Trainer(engine, synthetic_batches(), max_steps=3, log_every=10, show_progress=False)
    trainer.fit()
    state = trainer.state_dict()
    assert [r["step"] for r in state["history"]] == [1, 2, 3]
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in state["history"])


class PoisonedModel(MegaMoEForMultiTask):
    """Its loss is NaN on the training forwards numbered in ``poisoned`` (1-based)."""

    poisoned: frozenset[int] = frozenset()
    forwards = 0

    def forward(self, **inputs):
        output = super().forward(**inputs)
        if self.training:
            self.forwards += 1
            if self.forwards in self.poisoned:
                output.loss = output.loss * float("nan")
        return output


def poisoned_trainer(poisoned, zero_stage, **trainer_args):
    torch.manual_seed(0)
    model = PoisonedModel(tiny_config())
    model.poisoned = frozenset(poisoned)
    train = TrainSection(max_steps=6, micro_batch_size=8, lr=1e-2, warmup_ratio=0.0)
    engine = Engine(model, deepspeed_config(train, ParallelSection(zero_stage=zero_stage)))
    weights_after = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, trainer, step):
            weights_after[step] = {n: p.detach().clone() for n, p in engine.engine.module.named_parameters()}

    trainer = Trainer(
        engine, synthetic_batches(), max_steps=6, callbacks=[Snapshot()], show_progress=False, **trainer_args
    )
    return trainer, weights_after


@pytest.mark.parametrize(
    "zero_stage", [0, 2], ids=["no ZeRO, fp32: megamoe's own check", "ZeRO-2: DeepSpeed's"]
)
def test_a_step_with_a_nan_loss_is_skipped_counted_and_left_out_of_the_logged_means(tmp_path, zero_stage):
    trainer, weights_after = poisoned_trainer({3}, zero_stage, log_every=6)
    history = trainer.fit()
    assert trainer.skipped_steps == [3]
    # DeepSpeed counts it as its own skips, and holds the LR schedule: one step behind at the end.
    assert (
        trainer.engine.engine.skipped_steps,
        trainer.engine.scheduler.state_dict()["last_batch_iteration"],
    ) == (1, 4)
    for name, value in weights_after[3].items():
        assert torch.equal(value, weights_after[2][name]), f"{name} changed in the skipped step"
    changed = [
        name for name in weights_after[4] if not torch.equal(weights_after[4][name], weights_after[3][name])
    ]
    assert changed, "the next step trains again"
    assert all(torch.isfinite(value).all() for value in weights_after[6].values())
    assert [record.step for record in history if record.skipped] == [3]
    assert math.isnan(history[2].loss) and all(math.isfinite(r.loss) for r in history if not r.skipped)
    # The logged means leave it out; the count is logged.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megamoe.engine.run_logger import RunLogger

    logger = RunLogger(tmp_path, enabled=True)
    logger.log_step(6, history, 1.0, trainer.last_router_stats, skipped_steps=len(trainer.skipped_steps))
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalar = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}
    assert scalar["train/skipped_steps"] == 1
    assert scalar["train/loss"] == pytest.approx(sum(r.loss for r in history if not r.skipped) / 5)


def test_skipped_steps_in_a_row_end_the_run_naming_them_and_the_checkpoint_to_resume():
    trainer, _ = poisoned_trainer({2, 4, 5}, 2, max_skipped_steps_in_a_row=2, last_checkpoint=lambda: 3)
    with pytest.raises(TrainingDivergedError, match=r"steps 4\.\.5: 2 optimizer steps in a row") as error:
        trainer.fit()
    assert "the newest checkpoint (step 3) is sound to resume from (--resume)" in str(error.value)
    assert trainer.skipped_steps == [2, 4, 5], "2 alone was not the end"
    # A resumed trainer counts the run's skipped steps on (they are in its checkpoint).
    resumed, _ = poisoned_trainer((), 2)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.skipped_steps == [2, 4, 5]


def test_callbacks_run_in_order_around_each_step_evaluation_and_checkpoints_at_their_cadence(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megamoe.engine.callbacks import CheckpointCallback, EvaluationCallback, LoggerCallback
    from megamoe.engine.run_logger import RunLogger

    events = []

    class Recorder(TrainerCallback):
        def on_fit_start(self, trainer):
            events.append("start")

        def on_micro_batch_end(self, trainer, batch):
            events.append(f"micro {trainer.step}")

        def on_log(self, trainer, step, records, tokens_per_s):
            events.append(f"log {step}: {[r.step for r in records]}")

        def on_step_end(self, trainer, step):
            events.append(f"end {step}")

    engine = Engine(MegaMoEForMultiTask(tiny_config()), deepspeed_config(TrainSection(max_steps=5)))
    logger = RunLogger(tmp_path, enabled=True)
    trainer = Trainer(
        engine,
        synthetic_batches(),
        max_steps=5,
        log_every=2,
        callbacks=[
            Recorder(),
            LoggerCallback(logger),
            EvaluationCallback(lambda step: events.append(f"evaluate {step}") or {"score": step}, every=2),
            CheckpointCallback(lambda step: events.append(f"save {step}"), every=3),
        ],
        show_progress=False,
    )
    trainer.fit()
    assert events == [
        "start",
        "micro 1",
        "end 1",
        "micro 2",
        "log 2: [1, 2]",
        "end 2",
        "evaluate 2",
        "micro 3",
        "end 3",
        "save 3",
        "micro 4",
        "log 4: [3, 4]",
        "end 4",
        "evaluate 4",
        "micro 5",
        "log 5: [5]",
        "end 5",
    ], "the last step's evaluation is the caller's"
    assert trainer.evaluations == [{"step": 2, "score": 2}, {"step": 4, "score": 4}]
    logger.close()
    logged = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})  # 0: keep every one
    logged.Reload()
    assert [event.step for event in logged.Scalars("train/loss")] == [2, 4, 5]
    assert [event.step for event in logged.Histograms("expert_load/layer_1")] == [2, 4, 5], "router stats"


def _zero_engine(zero_stage: int, offload_optimizer: bool = False) -> tuple[MegaMoEForMultiTask, Engine]:
    from megamoe.tasks.objective import MultiTaskObjective
    from megamoe.tasks.weighting import build_weighting

    torch.manual_seed(0)
    model = MegaMoEForMultiTask(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    objective = MultiTaskObjective(model, build_weighting("static", list(model.config.tasks)))
    train = TrainSection(max_steps=6, micro_batch_size=8, lr=1e-2, warmup_ratio=0.0)
    parallel = ParallelSection(zero_stage=zero_stage, offload_optimizer=offload_optimizer)
    return model, Engine(objective, deepspeed_config(train, parallel))


@pytest.mark.parametrize("offload_optimizer", [False, True], ids=["zero3", "zero3_offload"])
def test_under_zero3_an_idle_head_steps_with_a_zero_gradient_as_under_zero2(offload_optimizer):
    """One task per step (topic, ner, sentiment, ...): two of the three heads are idle in every step. ZeRO-2
    steps them with a zero gradient (Adam's moments decay, the weights still move); ZeRO-3 must too."""
    import deepspeed

    runs = []
    for zero_stage, offload in ((2, False), (3, offload_optimizer)):
        model, engine = _zero_engine(zero_stage, offload)
        losses = [engine.train_step(batch).loss.item() for batch in itertools.islice(synthetic_batches(), 6)]
        runs.append((model, losses))
    (zero2, zero2_losses), (zero3, zero3_losses) = runs
    assert zero3_losses == pytest.approx(zero2_losses, rel=1e-5)
    with deepspeed.zero.GatheredParameters(list(zero3.parameters())):
        for name, value in zero3.state_dict().items():
            torch.testing.assert_close(value, zero2.state_dict()[name], rtol=0, atol=1e-6, msg=name)


def test_deepspeed_zero3_alone_steps_an_idle_parameter_with_its_last_gradient():
    """Why `IdleGradientZeroFill` exists. With DeepSpeed's own backward/step (not `Engine.train_step`), the
    topic head's gradient partition from the step that trained it stays for the next step, which trains
    another task. When this fails, DeepSpeed zero-fills by itself and the fill can go."""
    from deepspeed.utils import safe_get_local_grad

    model, engine = _zero_engine(zero_stage=3)
    ds_engine, head = engine.engine, model.heads["topic"].out_proj.weight
    grads = []
    for batch in itertools.islice(synthetic_batches(), 2):  # topic, then ner
        ds_engine.backward(ds_engine(**batch).loss)
        grads.append(safe_get_local_grad(head).clone())
        ds_engine.step()
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[1], grads[0]), "the stale gradient the ner step steps the topic head with"
