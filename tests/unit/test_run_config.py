"""The run config: strict YAML, dotted overrides, errors that name the field."""

import textwrap

import pytest

from megamoe.config import ConfigError, ExperimentConfig, TaskConfig, load_config

YAML = """
run_dir: runs/test
model:
  init: upcycle
  base: sentence-transformers/all-MiniLM-L6-v2
  architecture: {num_experts: 8, num_experts_per_tok: 2}
tasks:
  topic: {type: sequence_classification, source: "builtin:bbc_news"}
  ner: {type: token_classification, source: "builtin:wnut16", weight: 2}
train: {max_steps: 50, lr: 3.0e-4}
"""


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_loads_typed_sections(tmp_path):
    config = load_config(write(tmp_path, YAML))
    assert isinstance(config, ExperimentConfig)
    assert isinstance(config.tasks["ner"], TaskConfig)
    assert config.tasks["ner"].weight == 2.0 and isinstance(config.tasks["ner"].weight, float)
    assert config.model.architecture == {"num_experts": 8, "num_experts_per_tok": 2}
    assert (config.train.max_steps, config.train.lr, config.data.max_length) == (50, 3e-4, 128)
    assert (config.tasks["topic"].metric, config.tasks["ner"].metric) == ("accuracy", "f1")


def test_dotted_overrides(tmp_path):
    config = load_config(
        write(tmp_path, YAML),
        [
            "train.lr=1e-5",
            "train.head_lr=1e-3",
            "data.sampling=round_robin",
            "tasks.topic.weight=0.5",
            "model.architecture.num_experts=4",
        ],
    )
    assert config.train.lr == 1e-5 and config.train.head_lr == 1e-3
    assert config.data.sampling == "round_robin"
    assert config.tasks["topic"].weight == 0.5
    assert config.model.architecture["num_experts"] == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.lrr=1"],
            "run.yaml: train: unknown key 'lrr'; allowed keys: ['eval_every', 'global_batch_size', 'gradient_accumulation_steps'",
        ),
        (["train.max_steps=ten"], "train.max_steps: expected int, got str 'ten'"),
        (["train.max_steps=0"], "train.max_steps: must be >= 1, got 0"),
        (["train.head_lr=0"], "train.head_lr: must be > 0, got 0"),
        (
            ["tasks.topic.type=sequence_clasification"],
            "tasks.topic.type: 'sequence_clasification' is not one of",
        ),
        (["tasks.ner.weight=-1"], "tasks.ner.weight: must be >= 0"),
        (
            ["data.sampling=uniform"],
            "data.sampling: 'uniform' is not one of proportional, temperature, round_robin, epochs",
        ),
        (["model.init=scratch"], "model.tokenizer: init='scratch' needs a tokenizer"),
        (["tasks.topic={type: token_classification}"], "tasks.topic: missing required key(s) ['source']"),
        (["train.precision=fp8"], "train.precision: 'fp8' is not one of fp32, bf16, fp16"),
        (
            ["tasks.ner.metric=accuracy"],
            "tasks.ner.metric: 'accuracy' is not one of ['f1', 'precision', 'recall']",
        ),
        (["train"], "override 'train' is not of the form section.key=value"),
        (["parallel.zero_stage=4"], "parallel.zero_stage: must be 0, 1, 2 or 3, got 4"),
        (
            ["parallel.zero_stage=0", "parallel.offload_optimizer=true"],
            "parallel.offload_optimizer: ZeRO-Offload needs zero_stage >= 1",
        ),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last: must be >= 1, got 0"),
        (["train.lr=[1"], "override 'train.lr=[1': the value is not valid YAML"),
        (["run_dir=run.yaml"], "run_dir: run.yaml is a file; give a directory"),
        (
            ["train.loss_weighting=uncertainty"],
            "tasks.ner.weight: a static loss weight, but train.loss_weighting is 'uncertainty', which sets "
            "the task weights itself: remove the weight, or use loss_weighting: static",
        ),
        (
            ["train.loss_weighting=dwa", "tasks.ner.weight=1", "tasks.topic.weight=0.5"],
            "tasks.topic.weight: a static",
        ),
    ],
)
def test_bad_values_name_the_field(tmp_path, overrides, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, YAML), overrides)
    assert message in str(excinfo.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory; give the run config's YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "tasks: [unclosed"))
    with pytest.raises(ConfigError, match="tasks: declare at least one task"):
        load_config(write(tmp_path, "tasks: {}\nmodel: {init: pretrained, base: x}"))
    with pytest.raises(ConfigError, match=r"config: missing required key\(s\) \['model'\]"):
        load_config(write(tmp_path, "tasks: {t: {type: sequence_regression, source: x}}"))
