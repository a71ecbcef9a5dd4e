"""`megamoe train`: config → data → model → engine → batches → trainer.fit() → evaluate → save.

One visible build sequence; every piece is built here and handed to the next.
"""

import inspect
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from transformers import AutoConfig, PreTrainedTokenizerBase

from .checkpoint import hf_moe_config, load_hf_moe, upcycle_pretrained
from .checkpoint.builtin_models import resolve_model_source
from .checkpoint.export import export_checkpoint
from .checkpoint.model_card import RUN_CONFIG_FILENAME, save_model_card
from .checkpoint.resume import Checkpointer, CheckpointError, Topology, resolve_checkpoint, tag_for
from .config import ConfigError, ExperimentConfig
from .data.collate import MultiTaskCollator
from .data.pipeline import TaskData, prepare_task_data
from .data.sampling import build_batches
from .data.tokenization import load_tokenizer
from .engine.deepspeed_engine import (
    Engine,
    check_topology,
    deepspeed_config,
    launch_world_size,
    merge_user_deepspeed_config,
    user_deepspeed_config_path,
)
from .engine.host_memory import describe_host_memory
from .engine.run_logger import RunLogger
from .engine.trainer import StepRecord, Trainer
from .model import MegaMoEConfig, MegaMoEForMultiTask
from .tasks.evaluation import evaluate
from .tasks.metrics import format_metrics_table, write_json_atomic
from .tasks.objective import MultiTaskObjective
from .tasks.weighting import build_weighting

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, dict[str, dict[str, float]]]
    history: list[StepRecord]


def build_model(
    config: ExperimentConfig, tasks: dict[str, TaskData], tokenizer: PreTrainedTokenizerBase
) -> MegaMoEForMultiTask:
    """The network named by ``config.model``, with one head per task."""
    section = config.model
    task_specs = {name: task.model_spec for name, task in tasks.items()}
    if section.init == "upcycle":
        assert section.base is not None  # validated by ModelSection
        return upcycle_pretrained(
            resolve_model_source(section.base, config.data.cache_dir),
            tasks=task_specs,
            expert_noise_std=section.expert_noise_std,
            seed=config.train.seed,
            **section.architecture,
        )
    if section.init == "hf_moe":
        assert section.base is not None  # validated by ModelSection
        return load_hf_moe(
            resolve_model_source(section.base, config.data.cache_dir),
            tasks=task_specs,
            seed=config.train.seed,
            **section.architecture,
        )
    if section.init == "pretrained":
        assert section.base is not None  # validated by ModelSection
        base = resolve_model_source(section.base, config.data.cache_dir)
        saved_tasks = MegaMoEConfig.from_pretrained(base).tasks
        if saved_tasks and saved_tasks != task_specs:
            raise ConfigError(
                f"{section.base} was trained for tasks {saved_tasks}, the run declares {task_specs}: "
                "use init: upcycle / scratch, or the same tasks and labels"
            )
        # A backbone without heads (`megamoe upcycle`) gets fresh ones for the run's tasks.
        return MegaMoEForMultiTask.from_pretrained(base, tasks=task_specs)
    architecture = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        **section.architecture,
    }
    return MegaMoEForMultiTask(MegaMoEConfig(tasks=task_specs, **architecture))


def check_checkpoint_tasks(tag_dir: Path, tasks: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume a checkpoint whose task heads (names, types, labels) differ from this run's."""
    saved = MegaMoEConfig.from_pretrained(tag_dir / "hf").tasks
    if saved != tasks:
        raise CheckpointError(
            f"{tag_dir} was trained for tasks {saved}, this run declares {tasks}: resume with the same tasks "
            "and labels, or start a new run from it (megamoe export, then model.init: pretrained)"
        )


def declared_model_config(config: ExperimentConfig) -> MegaMoEConfig:
    """The architecture the run will build, read from config files only (before any heavy work).

    A base that is missing or not what ``model.init`` needs, an unknown or invalid ``model.architecture``
    field: `ConfigError` naming the key.
    """
    section = config.model
    unknown = sorted(set(section.architecture) - _ARCHITECTURE_FIELDS)
    if unknown:
        raise ConfigError(
            f"model.architecture: unknown key {unknown[0]!r}; MegaMoEConfig fields: {sorted(_ARCHITECTURE_FIELDS)}"
        )
    try:
        if section.init == "scratch":
            return MegaMoEConfig(**{"tasks": {}, **section.architecture})
        assert section.base is not None  # validated by ModelSection
        base = resolve_model_source(section.base, config.data.cache_dir)
        if section.init == "hf_moe":
            return hf_moe_config(base, tasks={}, **section.architecture)
        found = AutoConfig.from_pretrained(base)
        if section.init == "pretrained":
            if not isinstance(found, MegaMoEConfig):
                raise ConfigError(
                    f"model.base: {section.base} holds a {found.model_type!r} model, not a MegaMoE one: use "
                    "model.init: upcycle for a dense BERT-family encoder, hf_moe for an HF MoE model"
                )
            return found
        # upcycle: the dense model's positions, the architecture fields checked one by one
        return MegaMoEConfig(
            **{"tasks": {}, "max_position_embeddings": found.max_position_embeddings, **section.architecture}
        )
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None


# What `model.architecture` may set: MegaMoEConfig's own fields (the tasks come from the run's `tasks`).
_ARCHITECTURE_FIELDS = set(inspect.signature(MegaMoEConfig.__init__).parameters) - {
    "self",
    "tasks",
    "backbone",
}


def run(
    config: ExperimentConfig, *, resume: str | Path | None = None, show_progress: bool = True
) -> RunResult:
    """Train, evaluate and export; ``resume`` is a checkpoint path (a run directory resumes its latest)."""
    run_dir = Path(config.run_dir)
    # 0. Refuse a config that does not fit the launched ranks, before any data, model or collective work.
    model_config = declared_model_config(config)
    check_topology(config.train, config.parallel, world_size=launch_world_size(), model=model_config)
    if config.data.max_length > model_config.max_position_embeddings:
        raise ConfigError(
            f"data.max_length: {config.data.max_length} is more than the model's max_position_embeddings "
            f"{model_config.max_position_embeddings}"
        )
    if resume is not None:  # a missing checkpoint is an error now, not after the model is built
        resume = resolve_checkpoint(resume)
    torch.manual_seed(config.train.seed)

    # 1. Data: load every task, infer its labels, tokenize.
    tokenizer_source = config.model.tokenizer or config.model.base
    assert tokenizer_source is not None  # validated by ModelSection
    try:
        tokenizer = load_tokenizer(
            resolve_model_source(tokenizer_source, config.data.cache_dir),
            pretokenized=any(task.type == "token_classification" for task in config.tasks.values()),
        )
    except (OSError, ValueError) as err:
        key = "model.tokenizer" if config.model.tokenizer else "model.base"
        raise ConfigError(f"{key}: cannot load a tokenizer from {tokenizer_source}: {err}") from None
    tasks = prepare_task_data(config, tokenizer)

    # 2. Model and objective (task heads + loss weighting + router losses).
    model = build_model(config, tasks, tokenizer)
    if resume is not None:
        check_checkpoint_tasks(resume, model.config.tasks)
    alphas = {name: task.weight for name, task in config.tasks.items()}
    objective = MultiTaskObjective(
        model, build_weighting(config.train.loss_weighting, list(tasks), alphas=alphas)
    )

    # 3. Engine: DeepSpeed (experts sharded over the EP group), its JSON written into the run directory.
    parallel = config.parallel
    ds_config = deepspeed_config(config.train, parallel)
    user_ds_config = user_deepspeed_config_path(parallel)
    if user_ds_config is not None:
        ds_config = merge_user_deepspeed_config(user_ds_config, ds_config, world_size=launch_world_size())
    engine = Engine(
        objective,
        ds_config,
        run_dir=run_dir,
        expert_parallel_size=parallel.expert_parallel_size,
        timeout_minutes=parallel.timeout_minutes,
    )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(config.train.seed + rank)  # every rank built the same model; dropout differs per rank
    if rank == 0 and not torch.cuda.is_available():
        print(describe_host_memory())  # CPU speed hinges on it (megamoe.engine.host_memory)
    if rank == 0:  # the run as it ran, overrides applied (the model card shows it)
        (run_dir / RUN_CONFIG_FILENAME).write_text(yaml.safe_dump(asdict(config), sort_keys=False))

    # 4. Batches: one task per micro-batch, same schedule on every rank, examples sharded by rank.
    collate = MultiTaskCollator(tokenizer.pad_token_id)
    batches = build_batches(
        {name: task.splits["train"] for name, task in tasks.items()},
        collate,
        strategy=config.data.sampling,
        temperature=config.data.temperature,
        micro_batch_size=config.train.micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=config.train.seed,
        epochs={name: task.epochs for name, task in config.tasks.items()},
    )

    # 5. Train (resuming if asked), evaluating every eval_every steps and checkpointing every every_steps.
    def validate(step: int) -> dict[str, Any]:
        return evaluate(engine.eval_forward, tasks, ("validation",), collate)[0]

    def write_hf_files(directory: Path) -> None:
        model.config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    def on_step_end(step: int) -> None:
        if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
            checkpointer.save(step)

    logger = RunLogger(run_dir / "tensorboard", enabled=rank == 0, tensorboard=config.logging.tensorboard)
    trainer = Trainer(
        engine,
        batches,
        max_steps=config.train.max_steps,
        grad_accum=config.train.gradient_accumulation_steps,
        evaluate=validate,
        eval_every=config.train.eval_every,
        task_weights=objective.weighting.current_weights,
        on_step_end=on_step_end,
        logger=logger,
        log_every=config.logging.every_steps,
        show_progress=show_progress and rank == 0,
    )
    checkpointer = Checkpointer(
        engine.engine,
        run_dir / "checkpoints",
        topology=Topology(world_size, parallel.expert_parallel_size, parallel.zero_stage),
        rank_local={"batches": batches, "weighting": objective.weighting, "trainer": trainer},
        write_hf_files=write_hf_files,
        keep_last=config.checkpoint.keep_last,
    )
    if resume is not None:
        step = checkpointer.load(resume)
        if rank == 0:
            print(f"resumed from step {step} ({resume})")
    history = trainer.fit()
    last_checkpoint = run_dir / "checkpoints" / tag_for(trainer.step)
    if not last_checkpoint.is_dir():
        last_checkpoint = checkpointer.save(trainer.step)
    logger.close()

    # 6. Final evaluation, metrics.json, and the model gathered from every shard into an HF directory.
    metrics, utilization = evaluate(
        engine.eval_forward, tasks, ("validation", "test"), collate, show_progress=show_progress and rank == 0
    )
    if rank == 0:
        print(format_metrics_table(metrics))
        write_json_atomic(run_dir / "metrics.json", metrics)
        write_json_atomic(
            run_dir / "expert_utilization.json",
            {"fractions": utilization.fractions(), "imbalance": utilization.imbalance()},
        )
        write_json_atomic(run_dir / "history.json", [asdict(record) for record in history])
        export_checkpoint(last_checkpoint, run_dir / "model")
        save_model_card(run_dir / "model")
    dist.barrier()
    return RunResult(run_dir=run_dir, metrics=metrics, history=history)
