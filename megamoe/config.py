"""The run configuration: typed dataclasses, loaded strictly from YAML with dotted overrides.

Architecture lives in `MegaMoEConfig` (it travels to the Hub); everything about one run (tasks and their
data, the optimizer, parallelism) lives here and never leaves the run directory. YAML is a strict
serialization of these classes: an unknown key fails with its dotted path and the allowed keys, a wrong
type fails with the field's path, and ``__post_init__`` checks values with a `ValueError` naming the field.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .data.sampling import SAMPLING_STRATEGIES
from .model.configuration_megamoe import TASK_TYPES

T = TypeVar("T")


HEADLINE_METRICS = {
    "sequence_classification": ("accuracy", "macro_f1"),
    "token_classification": ("f1", "precision", "recall"),
    "sequence_regression": ("mae", "pearson"),
}
"""Metrics a task can be judged by, the first being the default."""


MODEL_INITS = ("upcycle", "pretrained", "hf_moe", "scratch")


class ConfigError(ValueError):
    """A run config that cannot be used, with the dotted path of the offending field."""


@dataclass
class TaskConfig:
    """One task: its head, where its data comes from, and its weight in the joint loss."""

    type: str
    """`sequence_classification`, `token_classification` or `sequence_regression`."""
    source: str
    """`builtin:<name>` (offline datasets), a local file / directory, or a Hub dataset name."""
    labels: list[str] | None = None
    """Label names in id order; `None` = inferred (sorted) from the training split."""
    weight: float = 1.0
    """Static loss weight alpha_t; only with `train.loss_weighting: static` (the adaptive weightings set
    the weights themselves, so a weight beside them is refused rather than ignored)."""
    epochs: float = 1.0
    """With `data.sampling: epochs`, this task's share of micro-batches is ∝ epochs x train size: a run of
    sum_t(epochs_t x n_t) / batch steps passes over each task its own number of times."""
    metric: str | None = None
    """The metric the task is judged by (summaries, benchmarks); default: accuracy / entity F1 / MAE by type."""
    text_column: str = "text"
    """Input text column (sequence tasks)."""
    label_column: str = "label"
    """Label column (sequence tasks)."""
    tokens_column: str = "tokens"
    """Word list column (token tasks)."""
    tags_column: str = "tags"
    """Per-word tag column (token tasks)."""
    max_train_examples: int | None = None
    """Use only the first n training examples (quick runs); `None` = all."""
    max_eval_examples: int | None = None
    """Evaluate on only the first n validation / test examples (quick runs); `None` = all."""
    max_length: int | None = None
    """Truncate this task's inputs to n tokens instead of `data.max_length`: long documents (news articles)
    beside short snippets (tweets), each task at the length it needs; `None` = `data.max_length`."""

    def __post_init__(self) -> None:
        _check(self.type in TASK_TYPES, "type", f"{self.type!r} is not one of {list(TASK_TYPES)}")
        allowed = HEADLINE_METRICS[self.type]
        if self.metric is None:
            self.metric = allowed[0]
        _check(
            self.metric in allowed,
            "metric",
            f"{self.metric!r} is not one of {list(allowed)} for a {self.type} task",
        )
        _check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        _check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, f"must be > 0, got {value}")
        _check(
            self.max_length is None or self.max_length >= 8,
            "max_length",
            f"must be >= 8, got {self.max_length}",
        )


@dataclass
class ModelSection:
    """Which network to train."""

    init: str = "upcycle"
    """`upcycle` (a dense BERT-family checkpoint turned into MoE), `pretrained` (a MegaMoE checkpoint),
    `hf_moe` (a published HF MoE model — Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2/V3 — as the
    shared backbone) or `scratch` (random init from `architecture`)."""
    base: str | None = None
    """Dense checkpoint (upcycle), MegaMoE checkpoint (pretrained) or HF MoE model (hf_moe): local directory
    or Hub id."""
    tokenizer: str | None = None
    """Tokenizer directory or Hub id; defaults to `base`."""
    architecture: dict[str, Any] = field(default_factory=dict)
    """`MegaMoEConfig` keyword arguments (num_experts, num_experts_per_tok, moe_layer_freq, ...)."""
    expert_noise_std: float = 0.0
    """Upcycling: relative noise on each expert copy (0 keeps the dense model's outputs exactly)."""

    def __post_init__(self) -> None:
        _check(
            self.init in MODEL_INITS,
            "init",
            f"{self.init!r} is not one of {', '.join(MODEL_INITS)}",
        )
        _check(
            self.init == "scratch" or self.base is not None,
            "base",
            f"init={self.init!r} needs a base checkpoint",
        )
        _check(
            self.init != "scratch" or self.tokenizer is not None,
            "tokenizer",
            "init='scratch' needs a tokenizer",
        )
        _check(self.expert_noise_std >= 0, "expert_noise_std", f"must be >= 0, got {self.expert_noise_std}")
        _check(
            self.expert_noise_std == 0 or self.init == "upcycle",
            "expert_noise_std",
            f"only init: upcycle copies experts (init: {self.init}); drop it",
        )


@dataclass
class DataSection:
    """Tokenization and how steps are shared between tasks."""

    max_length: int = 128
    """Sub-tokens per example after truncation."""
    sampling: str = "temperature"
    """Task schedule: `proportional`, `temperature` (p ~ n^(1/T)), `round_robin`, or `epochs` (p ~ the
    tasks' `epochs` x size)."""
    temperature: float = 2.0
    """T of temperature sampling."""
    label_all_subtokens: bool = False
    """NER: label every sub-token of a word (B- continuations become I-), not only the first."""
    cache_dir: str | None = None
    """Where builtin datasets are prepared; default `$MEGAMOE_CACHE` or `~/.cache/megamoe`."""

    def __post_init__(self) -> None:
        _check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")
        _check(
            self.sampling in SAMPLING_STRATEGIES,
            "sampling",
            f"{self.sampling!r} is not one of {', '.join(SAMPLING_STRATEGIES)}",
        )
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")


@dataclass
class TrainSection:
    """Optimization."""

    max_steps: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 16
    """Examples per rank per forward."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    global_batch_size: int | None = None
    """Examples per optimizer step over all ranks; when set, must equal micro-batch x grad-accum x ranks."""
    lr: float = 1e-4
    """Peak learning rate."""
    head_lr: float | None = None
    """Peak learning rate of what starts from scratch: the task heads and the loss weighting's parameters
    (uncertainty's; None = `lr`). They may want a higher rate than a pretrained body tolerates; the schedule's
    shape is the body's."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warmup; then linear decay to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    precision: str = "fp32"
    """`fp32`, `bf16` or `fp16`."""
    seed: int = 0
    """Seeds the model init, the task schedule and the data order."""
    loss_weighting: str = "static"
    """`static`, `uncertainty` or `dwa`."""
    eval_every: int = 0
    """Evaluate on validation every n steps (0 = only at the end)."""
    max_skipped_steps_in_a_row: int = 20
    """A step whose loss or gradients are inf or NaN on some rank is skipped on every rank (no weight
    changes); this many in a row end the run with an error naming them (0 = never). fp16's loss scaler skips
    a few steps while it finds its scale."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.head_lr is None or self.head_lr > 0, "head_lr", f"must be > 0, got {self.head_lr}")
        _check(
            self.max_skipped_steps_in_a_row >= 0,
            "max_skipped_steps_in_a_row",
            f"must be >= 0, got {self.max_skipped_steps_in_a_row}",
        )
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(
            self.precision in ("fp32", "bf16", "fp16"),
            "precision",
            f"{self.precision!r} is not one of fp32, bf16, fp16",
        )
        _check(
            self.loss_weighting in ("static", "uncertainty", "dwa"),
            "loss_weighting",
            f"{self.loss_weighting!r} is not one of static, uncertainty, dwa",
        )


@dataclass
class ParallelSection:
    """How the model is spread over ranks (world size comes from the launcher)."""

    expert_parallel_size: int = 1
    """Ranks that share one copy of the experts (each holds num_experts / this many); 1 = no EP."""
    zero_stage: int = 2
    """ZeRO stage over the non-expert parameters (expert ones over the expert-data-parallel group)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer states (and the fp32 master weights) in CPU memory."""
    timeout_minutes: float = 30.0
    """A collective that waits longer than this fails (naming the rank) instead of hanging."""
    deepspeed_config: str | None = None
    """Your own DeepSpeed JSON, merged over the generated one: its other sections (optimizer, scheduler,
    communication, activation checkpointing, ...) win; batch sizes, ZeRO stage, precision and clipping must
    agree with this run config."""

    def __post_init__(self) -> None:
        _check(
            self.expert_parallel_size >= 1,
            "expert_parallel_size",
            f"must be >= 1, got {self.expert_parallel_size}",
        )
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(
            not (self.offload_optimizer and self.zero_stage == 0),
            "offload_optimizer",
            "ZeRO-Offload needs zero_stage >= 1",
        )
        _check(self.timeout_minutes > 0, "timeout_minutes", f"must be > 0, got {self.timeout_minutes}")


@dataclass
class CheckpointSection:
    """DeepSpeed checkpoints for resuming (`megamoe export` turns one into an HF model)."""

    every_steps: int = 0
    """Save every n optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """How many checkpoints to keep (older ones are deleted after a newer one is complete)."""
    verify_on_resume: bool = True
    """Read every file of the checkpoint resumed from once, split among each node's ranks, to check its CRCs
    before loading it (~1 GB/s per rank): torch's loader checks none, so a damaged file would load as wrong
    weights. Off, only files cut short are found (from their last bytes)."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "every_steps", f"must be >= 0, got {self.every_steps}")
        _check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class LoggingSection:
    """What a run reports while it trains."""

    every_steps: int = 10
    """Write scalars (losses, task weights, expert load, tokens/s) every n optimizer steps."""
    tensorboard: bool = True
    """Also write them to TensorBoard event files in <run_dir>/tensorboard."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "every_steps", f"must be >= 1, got {self.every_steps}")


@dataclass
class ExperimentConfig:
    """A whole run: `megamoe train CONFIG.yaml [dotted.overrides ...]` reads one of these."""

    tasks: dict[str, TaskConfig]
    """Task name -> task."""
    model: ModelSection
    """The network (required: there is no sensible default checkpoint)."""
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    run_dir: str = "runs/megamoe"
    """Where the DeepSpeed config, checkpoints, logs and metrics.json go."""

    def __post_init__(self) -> None:
        _check(len(self.tasks) > 0, "tasks", "declare at least one task")
        weighted = sorted(name for name, task in self.tasks.items() if task.weight != 1.0)
        _check(
            self.train.loss_weighting == "static" or not weighted,
            f"tasks.{weighted[0] if weighted else ''}.weight",
            f"a static loss weight, but train.loss_weighting is {self.train.loss_weighting!r}, which sets "
            "the task weights itself: remove the weight, or use loss_weighting: static",
        )
        _check(not Path(self.run_dir).is_file(), "run_dir", f"{self.run_dir} is a file; give a directory")


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML run config, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give the run config's YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        apply_override(raw, override)
    try:
        return from_dict(ExperimentConfig, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict (creating sections as needed)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({err}); quote it") from None


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from plain data, checking keys and types; errors carry the dotted path."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _convert(hints[name], value, f"{path}.{name}" if path else name) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{path}.{err}" if path else str(err)) from None
    except TypeError as err:  # a required field is missing
        missing = [
            n
            for n, f in fields.items()
            if n not in data and f.default is f.default_factory is dataclasses.MISSING
        ]
        raise ConfigError(f"{where}: missing required key(s) {missing}") from err


def _convert(annotation: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, path)  # type: ignore[arg-type]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {k: _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; accept what a person means.
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, annotation) or (isinstance(value, bool) and annotation is not bool):
        raise ConfigError(f"{path}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value
